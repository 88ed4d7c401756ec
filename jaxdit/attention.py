"""One attention function, with the implementation chosen by config.

Axes: B batch, N query tokens, L key/value tokens, K heads, Dh head width.

Implementations: "xla" (softmax attention written in jnp with its own backward pass, everywhere),
"cudnn" (cuDNN flash attention, GPU) and "splash" (the Pallas splash-attention kernel that jax
ships for TPU, on any lengths, padded and masked to its 128-token tiles, and per device on a mesh);
"auto" takes the first of cudnn / splash that can run, else xla.
"""

import functools
import math

import einops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxdit.options import ATTENTION_IMPLEMENTATIONS

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention runs in 16-bit only
_CUDNN_MAX_HEAD_DIM = 128  # the largest head width every cuDNN flash kernel accepts
_CUDNN_PAD = 2  # cuDNN's training kernels with a mask (a bias) need even query and key lengths
_SPLASH_DTYPES = (jnp.float32, jnp.bfloat16)  # TPUs have no float16 matmul
_SPLASH_LANES = 128  # splash tiles are multiples of the TPU's 128 lanes: N and L are padded to them
_SPLASH_MAX_TILE = 512  # larger tiles spread the per-step cost over long video sequences
# Tests only: run the kernel in Pallas's interpreter (plain XLA ops, any backend and device count).
_SPLASH_INTERPRET = False


def _kernel_placeable() -> bool:
    """Whether the splash kernel can be placed on the devices: there is one, or the trace knows its
    mesh (a jit under `jaxdit.context_parallel.traced_on` or `jax.sharding.use_abstract_mesh`, or a
    shard_map), so that `_splash` runs it per device. XLA cannot partition a Pallas kernel itself."""
    return jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().empty


def resolve_implementation(
    implementation: str, dtype, head_dim: int, seq_lens: tuple[int, int] | None = None
) -> str:
    """The implementation that runs: "auto" -> "cudnn" or "splash" where one can run, else "xla".

    cudnn: a GPU, bfloat16/float16 compute, heads of at most 128 channels.
    splash: a TPU, float32/bfloat16 compute, and one device or a trace on a mesh (`_kernel_placeable`);
    any query and key lengths (they are padded). `seq_lens` (N, L), where given, is named in errors.
    An explicit choice where it cannot run is an error, never a silent fallback.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}: use {', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    backend, dtype = jax.default_backend(), jnp.dtype(dtype)
    cudnn_ok = backend == "gpu" and dtype in _CUDNN_DTYPES and head_dim <= _CUDNN_MAX_HEAD_DIM
    splash_ok = dtype in _SPLASH_DTYPES and (_SPLASH_INTERPRET or (backend == "tpu" and _kernel_placeable()))
    if implementation == "auto":
        return "cudnn" if cudnn_ok else "splash" if splash_ok else "xla"
    if implementation == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"model.attention='cudnn' needs a GPU, bfloat16/float16 compute and heads of at most "
            f"{_CUDNN_MAX_HEAD_DIM} channels; here backend={backend}, dtype={dtype.name}, "
            f"head width={head_dim}. Use 'auto' or 'xla'."
        )
    if implementation == "splash" and not splash_ok:
        mesh = dict(jax.sharding.get_abstract_mesh().shape) or None
        raise ValueError(
            f"model.attention='splash' needs a TPU, float32/bfloat16 compute, and one device or a trace on "
            f"the device mesh (jit under jaxdit.context_parallel.traced_on or jax.sharding.use_abstract_mesh: "
            f"XLA cannot partition a Pallas kernel); here backend={backend}, dtype={dtype.name}, lengths "
            f"(N, L)={seq_lens}, {jax.device_count()} devices, mesh of the trace {mesh}. Use 'auto' or 'xla'."
        )
    return implementation


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The splash kernel over (B, N, K, Dh) inputs, run on every device for its share. Under a jit
    over a mesh, a `jax.shard_map` over the mesh's automatic axes splits the batch and the heads
    (`_split_axes`); inside a shard_map over the whole mesh (context parallelism) each device already
    holds its share and runs the kernel directly."""
    mesh = jax.sharding.get_abstract_mesh()
    auto = [name for name in mesh.axis_names if name not in mesh.manual_axes]
    free = [name for name in auto if mesh.shape[name] > 1]
    if not free:
        return _splash_local(q, k, v, mask)  # (B, N, K, Dh)
    batch_axes, head_axes = _split_axes(mesh, free, batch=q.shape[0], heads=q.shape[2])
    tokens = PartitionSpec(batch_axes, None, head_axes, None)  # q, k, v and the output: (B, N, K, Dh)
    # check_vma=False: the kernel's outputs do not declare how they vary over the mesh axes.
    per_device = functools.partial(jax.shard_map, axis_names=set(auto), check_vma=False, out_specs=tokens)
    if mask is None:
        local = lambda q, k, v: _splash_local(q, k, v, None)
        return per_device(local, in_specs=(tokens,) * 3)(q, k, v)  # (B, N, K, Dh)
    keys = PartitionSpec(batch_axes, None)  # the mask: (B, L)
    return per_device(_splash_local, in_specs=(tokens,) * 3 + (keys,))(q, k, v, mask)  # (B, N, K, Dh)


def _split_axes(mesh, axes: list[str], *, batch: int, heads: int) -> tuple[tuple[str, ...] | None, ...]:
    """(batch axes, head axes) of the kernel's shard_map: each of `axes`, in mesh order, splits the
    batch if it divides what the earlier axes left of it (the model's data and fsdp axes do), else the
    heads likewise (a context axis outside context parallelism), else neither: replicated, every
    device along it computes the same."""
    split = {"batch": [], "heads": []}
    left = {"batch": batch, "heads": heads}
    for name in axes:
        dim = next((d for d in ("batch", "heads") if left[d] % mesh.shape[name] == 0), None)
        if dim is not None:
            split[dim].append(name)
            left[dim] //= mesh.shape[name]
    return tuple(split["batch"]) or None, tuple(split["heads"]) or None


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The Pallas TPU splash-attention kernel on this device's (B, N, K, Dh) inputs, any lengths; the
    softmax as `attention`'s.

    N and L are padded up to multiples of 128 with zeros. Segment ids say who attends to whom (a
    query attends to keys of its own id): every query, padded ones included, has id 1; the
    valid keys 1, the masked and the padded ones 0. So the real queries attend to exactly the
    valid keys, and a padded query to the same keys: its row is finite, and cut off at the end,
    so it adds nothing to any gradient.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas: imported only here

    (batch, n, heads, head_dim), length = q.shape, k.shape[1]
    q = _pad_tokens(q * head_dim**-0.5)  # (B, N', K, Dh); the kernel does not scale the logits
    k, v = _pad_tokens(k), _pad_tokens(v)  # 2x(B, L', K, Dh)
    padded_n, padded_length = q.shape[1], k.shape[1]
    segments = None
    if mask is not None or padded_length > length:
        valid = jnp.ones((batch, length), bool) if mask is None else mask  # (B, L)
        segments = splash.SegmentIds(
            q=jnp.ones((batch, padded_n), jnp.int32),  # (B, N')
            kv=jnp.pad(valid, ((0, 0), (0, padded_length - length))).astype(jnp.int32),  # (B, L')
        )
    # The largest tile up to _SPLASH_MAX_TILE that divides the padded length.
    tq, tkv = math.gcd(padded_n, _SPLASH_MAX_TILE), math.gcd(padded_length, _SPLASH_MAX_TILE)
    tiles = splash.BlockSizes(  # forward, then the backward's dk/dv and dq kernels
        block_q=tq, block_kv=tkv, block_q_dkv=tq, block_kv_dkv=tkv, block_q_dq=tq, block_kv_dq=tkv
    )
    kernel = splash.make_splash_mha(  # one example, every head; the batch is vmapped below
        splash.MultiHeadMask([splash.FullMask((padded_n, padded_length))] * heads),
        block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=_SPLASH_INTERPRET,
    )
    q, k, v = (einops.rearrange(x, "b n k h -> b k n h") for x in (q, k, v))  # (B, K, N', Dh), 2x(B, K, L', Dh)
    out = jax.vmap(kernel)(q, k, v, segments)  # (B, K, N', Dh)
    return einops.rearrange(out[:, :, :n], "b k n h -> b n k h")  # (B, N, K, Dh)


def _pad_tokens(x: jax.Array) -> jax.Array:
    """(B, N, K, Dh) -> (B, N', K, Dh): zeros after the tokens, up to N', the next multiple of 128."""
    return jnp.pad(x, ((0, 0), (0, -x.shape[1] % _SPLASH_LANES), (0, 0), (0, 0)))


def _masked_logit(dtype) -> float:
    """A masked key's logit: far below any real one, yet finite, so a row with every key masked
    stays finite (`attention` zeroes it)."""
    return 0.7 * float(jnp.finfo(dtype).min)


def _xla_forward(q, k, v, mask):
    """Heads-major softmax attention, and what its backward pass needs.

    q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) or None -> (B, N, K, Dh). The logits and
    the softmax are float32 (as jax.nn.dot_product_attention's), the products in the input dtype.
    """
    q = einops.rearrange(q * q.shape[-1] ** -0.5, "b n k h -> b k n h")  # (B, K, N, Dh), scaled
    k, v = (einops.rearrange(x, "b l k h -> b k l h") for x in (k, v))  # 2x(B, K, L, Dh)
    logits = jnp.einsum("bknh,bklh->bknl", q, k, preferred_element_type=jnp.float32)  # (B, K, N, L)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, _masked_logit(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, K, N, L)
    out = jnp.einsum("bknl,bklh->bknh", probs, v)  # (B, K, N, Dh)
    return einops.rearrange(out, "b k n h -> b n k h"), (q, k, v, probs, out)


def _xla_backward(residuals, d_out):
    """The softmax-attention gradients from the saved probabilities: d_out (B, N, K, Dh) ->
    (dq, dk, dv, None), the mask having none."""
    q, k, v, probs, out = residuals  # q scaled; all heads-major
    d_out = einops.rearrange(d_out, "b n k h -> b k n h")  # (B, K, N, Dh)
    d_v = jnp.einsum("bknl,bknh->bklh", probs, d_out)  # (B, K, L, Dh)
    d_probs = jnp.einsum("bknh,bklh->bknl", d_out, v, preferred_element_type=jnp.float32)  # (B, K, N, L)
    # softmax's Jacobian: d_logit = p (d_p - sum_l p d_p), and sum_l p d_p = <d_out, out> per row.
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (B, K, N, 1)
    d_logits = (probs * (d_probs - row)).astype(q.dtype)  # (B, K, N, L)
    d_q = jnp.einsum("bknl,bklh->bknh", d_logits, k) * q.shape[-1] ** -0.5  # (B, K, N, Dh)
    d_k = jnp.einsum("bknl,bknh->bklh", d_logits, q)  # (B, K, L, Dh)
    d_q, d_k, d_v = (einops.rearrange(x, "b k n h -> b n k h") for x in (d_q, d_k, d_v))
    return d_q, d_k, d_v, None


@jax.custom_vjp
def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The "xla" implementation. Its own backward pass, in heads-major layout from the saved
    probabilities, is ~2x faster on XLA:CPU than autodiff of jax.nn.dot_product_attention (whose
    transposes and batched products fall on slow paths there); on other backends it is the
    same computation. Inside a shard_map (context parallelism) jax's own attention runs instead:
    there replicated keys and values get cotangents summed over the devices, which autodiff
    inserts and a hand-written backward would have to."""
    return _xla_forward(q, k, v, mask)[0]


_xla.defvjp(_xla_forward, _xla_backward)


def _dot_product_attention(q, k, v, mask, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention over (B, N, K, Dh) queries and (B, L, K, Dh) keys, with the key
    padding mask (B, L). cuDNN's masked training kernels need even query and key lengths (text of 77
    tokens is not): for "cudnn" both are padded to the next multiple of _CUDNN_PAD, the padded keys
    masked and the padded queries' rows dropped, which changes no output or gradient."""
    n, length = q.shape[1], k.shape[1]
    if implementation == "cudnn" and mask is not None and (n % _CUDNN_PAD or length % _CUDNN_PAD):
        q = jnp.pad(q, ((0, 0), (0, -n % _CUDNN_PAD), (0, 0), (0, 0)))  # (B, N', K, Dh)
        k, v = (jnp.pad(x, ((0, 0), (0, -length % _CUDNN_PAD), (0, 0), (0, 0))) for x in (k, v))  # (B, L', K, Dh)
        mask = jnp.pad(mask, ((0, 0), (0, -length % _CUDNN_PAD)))  # (B, L'): the padding is never attended to
    full_mask = None if mask is None else jnp.broadcast_to(
        mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1])
    )  # (B, 1, N', L')
    out = jax.nn.dot_product_attention(q, k, v, mask=full_mask, implementation=implementation)  # (B, N', K, Dh)
    return out[:, :n]  # (B, N, K, Dh)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over every head.

    q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) bool: True where a key may be attended to.
    Returns (B, N, K, Dh). A query row whose keys are all masked returns zeros.
    """
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1], (q.shape[1], k.shape[1]))
    if impl == "splash":
        out = _splash(q, k, v, mask)  # (B, N, K, Dh)
    elif impl == "xla" and not jax.sharding.get_abstract_mesh().manual_axes:
        out = _xla(q, k, v, mask)  # (B, N, K, Dh)
    else:
        out = _dot_product_attention(q, k, v, mask, impl)  # (B, N, K, Dh)
    if mask is None:
        return out
    # With every key masked the softmax would spread evenly over the padding: return nothing instead.
    return out * mask.any(axis=1)[:, None, None, None].astype(out.dtype)  # (B, N, K, Dh)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, pairs: str = "halves") -> jax.Array:
    """Rotates each head's pairs by the token's angles: x (B, N, K, Dh), cos and sin (N, Dh/2) ->
    (B, N, K, Dh). Pair j is (x[..., j], x[..., j + Dh/2]) ("halves", GPT-NeoX's layout) or
    (x[..., 2j], x[..., 2j + 1]) ("interleaved", RoFormer's and Wan's). Dot products of rotated q and k
    see only offsets."""
    cos, sin = (a[None, :, None, :].astype(x.dtype) for a in (cos, sin))  # (1, N, 1, Dh/2)
    if pairs == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]  # 2x (B, N, K, Dh/2)
        return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)  # (B, N, K, Dh)
    x1, x2 = jnp.split(x, 2, axis=-1)  # 2x (B, N, K, Dh/2)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (B, N, K, Dh)
