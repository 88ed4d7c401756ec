"""Context (sequence) parallelism: each clip's video tokens split along the sequence over the
mesh's `context` axis, so that activation memory per device falls with the context size.

Axes: B batch, N tokens (n: this device's share), K heads (k: this device's share), Dh head width,
L text tokens, c the context size, u the Ulysses degree, r the ring degree (u * r = c).

Everything in a DiT block but attention is token-local (patch embedding, adaLN, norms, the MLP,
the final layer): it runs on each device's tokens unchanged, with XLA partitioning it from the
sharding `split_tokens` puts on the tokens. Only attention communicates, written by hand with
`jax.shard_map` inside the jitted step:
- self-attention, by `model.context_attention` (`jaxdit.options.context_degrees` says how c splits):
  - ulysses: an all-to-all turns the sequence shards into head shards (every token, K/c heads),
    the project's `attention()` runs locally (so cuDNN / splash / XLA all compose), and an
    all-to-all turns the result back. The heads must divide by c. Where the local attention is
    XLA's, it is rematerialised: its backward pass recomputes the scores rather than keeping them.
  - ring: each device keeps its queries and passes its K/V block around a ring of c devices with
    `lax.ppermute`; every block's partial attention is merged by its log-sum-exp (online softmax).
    The next block is sent before the current one is computed, so the transfer overlaps compute.
    Any head count. Merging needs each block's log-sum-exp, which the fused kernels do not
    return, so ring blocks are computed with XLA math (einsum, then the log-sum-exp kept as its
    max and sum of exponentials, in float32), each under `jax.checkpoint`: the backward pass
    recomputes a block's scores instead of keeping them, so memory is linear in the tokens.
  - ulysses_ring (USP): Ulysses within groups of u neighbouring devices, a ring of r = c / u
    across the groups, for context sizes larger than the heads allow Ulysses alone.
- cross-attention: the text tokens are replicated over the context axis, so each device attends
  from its own video tokens with no communication at all.

The model finds the context size in the abstract mesh of the trace, which `traced_on` sets
around the train step and the sampler; outside a mesh with a `context` axis over 1 device,
every function here is the plain single-device computation, exactly. Token counts that the
context size does not divide are padded with masked keys (`split_tokens`) and cut back after
the last block, so the output never depends on the padding.
"""

import functools
import math

import einops
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxdit.attention import attention, resolve_implementation
from jaxdit.options import CONTEXT_AXIS, context_degrees

# A masked key's logit: exp of it minus any real logit is exactly 0 in float32, and unlike -inf
# it never makes a NaN when a whole block is masked.
_MASKED_LOGIT = -1e30


def context_size() -> int:
    """The size of the `context` axis of the mesh this trace runs on; 1 without one (or inside a
    shard_map that already made it manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if CONTEXT_AXIS not in mesh.shape or CONTEXT_AXIS in mesh.manual_axes:
        return 1
    return mesh.shape[CONTEXT_AXIS]


def traced_on(mesh: jax.sharding.Mesh, fn):
    """`fn`, traced with `mesh` as the abstract mesh, where the model's context-parallel layers look
    for the context axis. Wrap the function a `jax.jit` compiles (inside the jit, not around it)."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def _batch_axes(batch: int):
    """The mesh axes the batch is split over inside attention: every axis but context (the train
    step's data and fsdp), or none when they do not divide the batch (then each context group
    computes the whole batch, which gives the same result)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(name for name in mesh.axis_names if name != CONTEXT_AXIS and mesh.shape[name] > 1)
    return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None


def split_tokens(tokens: jax.Array, rope=None):
    """Lays a clip's tokens out along the context axis before the first block.

    tokens (B, N, D), rope (cos, sin) each (N, Dh/2) or None -> (tokens (B, N', D), rope (N', Dh/2),
    key mask (B, N') or None), N' the next multiple of the context size. The padding tokens are
    zeros, masked as keys in self-attention; their outputs are cut off by `gather_tokens`. With
    a context size of 1 the tokens only stay split over the batch.
    """
    context = context_size()
    if context == 1:
        return _split_batch(tokens), rope, None
    n = tokens.shape[1]
    pad = -n % context
    mask = None
    if pad:
        tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))  # (B, N', D)
        if rope is not None:
            rope = tuple(jnp.pad(a, ((0, pad), (0, 0))) for a in rope)  # 2x (N', Dh/2)
        mask = jnp.broadcast_to(jnp.arange(n + pad) < n, tokens.shape[:2])  # (B, N')
    spec = PartitionSpec(_batch_axes(tokens.shape[0]), CONTEXT_AXIS, None)
    return jax.lax.with_sharding_constraint(tokens, spec), rope, mask  # (B, N', D), split along N'


def _split_batch(tokens: jax.Array) -> jax.Array:
    """Tokens (B, N, D) held split over the batch on a mesh without a context axis (data and fsdp), so that
    each device computes its own examples; unconstrained, XLA may follow the fsdp-split parameters instead
    and compute every example for a share of the heads, gathering activations rather than weights."""
    axes = _batch_axes(tokens.shape[0])
    return tokens if axes is None else jax.lax.with_sharding_constraint(tokens, PartitionSpec(axes, None, None))


def gather_tokens(tokens: jax.Array, n: int) -> jax.Array:
    """(B, N', ...) -> (B, n, ...): the tokens `split_tokens` padded, without the padding."""
    return tokens[:, :n]


def self_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, mode: str,
    implementation: str = "auto", ulysses_degree: int = 0,
) -> jax.Array:
    """`attention(q, k, v, mask)` over tokens split along the context axis, by `mode` (ulysses, ring,
    ulysses_ring); the plain `attention` when the context size is 1.

    q, k, v (B, N, K, Dh) with N a multiple of the context size (`split_tokens`), mask (B, N) bool:
    the keys that may be attended to. Returns (B, N, K, Dh). Raises ValueError where the heads do
    not split as `mode` needs (`jaxdit.options.context_degrees`).
    """
    context = context_size()
    if context == 1:
        return attention(q, k, v, mask=mask, implementation=implementation)
    if q.shape[1] % context:
        raise ValueError(f"{q.shape[1]} tokens do not split over the {context} devices of the context axis: "
                         "pad them with split_tokens first.")
    ulysses, ring = context_degrees(mode, q.shape[2], context, ulysses_degree)
    local = functools.partial(_local_self_attention, ulysses=ulysses, ring=ring, implementation=implementation)
    tokens = PartitionSpec(_batch_axes(q.shape[0]), CONTEXT_AXIS)
    per_device = functools.partial(
        jax.shard_map, out_specs=tokens, check_vma=ring > 1 or _checks_vma(implementation, q.dtype, q.shape[-1])
    )
    if mask is None:
        no_mask = lambda q, k, v: local(q, k, v, None)
        return per_device(no_mask, in_specs=(tokens,) * 3)(q, k, v)  # (B, N, K, Dh)
    out = per_device(local, in_specs=(tokens,) * 4)(q, k, v, mask)  # (B, N, K, Dh)
    if ring > 1:  # as attention(): a query whose keys are all masked gets zeros
        out = out * mask.any(axis=1)[:, None, None, None].astype(out.dtype)
    return out


def cross_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array, implementation: str = "auto"
) -> jax.Array:
    """Video tokens split along the context axis attend to whole (replicated) text tokens: no
    communication. q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) -> (B, N, K, Dh)."""
    context = context_size()
    if context == 1 or q.shape[1] % context:  # an unsplit sequence: XLA partitions it as it likes
        return attention(q, k, v, mask=mask, implementation=implementation)
    batch = _batch_axes(q.shape[0])
    tokens, whole = PartitionSpec(batch, CONTEXT_AXIS), PartitionSpec(batch)
    local = lambda q, k, v, mask: attention(q, k, v, mask=mask, implementation=implementation)  # (b, n, K, Dh)
    check_vma = _checks_vma(implementation, q.dtype, q.shape[-1])
    return jax.shard_map(local, in_specs=(tokens, whole, whole, whole), out_specs=tokens, check_vma=check_vma)(
        q, k, v, mask
    )  # (B, N, K, Dh)


def _checks_vma(implementation: str, dtype, head_dim: int) -> bool:
    """Whether a shard_map around `attention()` may check how values vary over the mesh axes: not
    around the splash kernel, whose Pallas outputs do not declare it (jax refuses them there)."""
    return resolve_implementation(implementation, dtype, head_dim) != "splash"


def _local_self_attention(q, k, v, mask, *, ulysses: int, ring: int, implementation: str):
    """One device's part. q, k, v (b, n, K, Dh): its n = N / c tokens, every head; mask (b, n) or None."""
    # Ulysses groups are runs of u neighbouring devices; None: one group of every device.
    groups = None if ring == 1 else [list(range(g * ulysses, (g + 1) * ulysses)) for g in range(ring)]
    if ulysses > 1:
        q, k, v = (_sequence_to_heads(x, groups) for x in (q, k, v))  # 3x (b, u n, K/u, Dh)
        if mask is not None:
            mask = jax.lax.all_gather(mask, CONTEXT_AXIS, axis=1, tiled=True, axis_index_groups=groups)  # (b, u n)
    if ring > 1:
        out = _ring_attention(q, k, v, mask, ulysses=ulysses, ring=ring)  # (b, u n, K/u, Dh)
    else:
        local = functools.partial(attention, implementation=implementation)
        if resolve_implementation(implementation, q.dtype, q.shape[-1]) == "xla":
            # XLA's attention would keep the (b, K/c, N, N) probabilities for the backward pass:
            # recompute them there instead, as the fused kernels do, so memory falls as 1/c.
            local = jax.checkpoint(local)
        out = local(q, k, v, mask=mask)  # (b, N, K/c, Dh)
    if ulysses > 1:
        out = _heads_to_sequence(out, groups)  # (b, n, K, Dh)
    return out


def _sequence_to_heads(x: jax.Array, groups) -> jax.Array:
    """(b, n, K, Dh) -> (b, u n, K/u, Dh): head chunk i goes to the group's device i, which
    concatenates the group's sequence chunks in device (= sequence) order."""
    return jax.lax.all_to_all(x, CONTEXT_AXIS, 2, 1, tiled=True, axis_index_groups=groups)


def _heads_to_sequence(x: jax.Array, groups) -> jax.Array:
    """(b, u n, K/u, Dh) -> (b, n, K, Dh): the inverse of `_sequence_to_heads`."""
    return jax.lax.all_to_all(x, CONTEXT_AXIS, 1, 2, tiled=True, axis_index_groups=groups)


def _ring_attention(q, k, v, mask, *, ulysses: int, ring: int) -> jax.Array:
    """Blockwise attention of this device's queries to the K/V blocks of the r devices of its ring.

    q, k, v (b, m, k, Dh), mask (b, m) or None. Device g*u + i of the context axis (group g, place
    i) sends its block to g'*u + i with g' = g + 1 mod r: every ring holds one place of every group.
    """
    perm = [(g * ulysses + i, ((g + 1) % ring) * ulysses + i) for g in range(ring) for i in range(ulysses)]
    send = lambda block: jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, perm), block)
    block = (k, v, mask)
    incoming = send(block)  # issued before this device's own block is computed: the two overlap
    partial = _block_attention(q, *block)  # this device's keys

    def step(carry, _):
        partial, block = carry
        incoming = send(block)  # the next block travels while this one is computed
        return (_merge(partial, _block_attention(q, *block)), incoming), None

    (partial, block), _ = jax.lax.scan(step, (partial, incoming), length=ring - 2)
    out, _, total = _merge(partial, _block_attention(q, *block))  # the last block: nothing more to send
    out = out / einops.rearrange(total, "b k m -> b m k 1")  # (b, m, k, Dh)
    return out.astype(q.dtype)


@jax.checkpoint  # the backward pass recomputes a block's scores rather than keeping r of them
def _block_attention(q, k, v, mask):
    """Softmax attention of q (b, m, k, Dh) to one K/V block (b, l, k, Dh) with key mask (b, l) or
    None, in float32 XLA math, before normalisation: (sum_l e^(s - max) v (b, m, k, Dh), the
    max logit (b, k, m), sum_l e^(s - max) (b, k, m)). The block's log-sum-exp is max + log(sum);
    kept in two parts, the merge subtracts logits, never large log-sum-exps, so float32 keeps a
    one-pass softmax's precision even with large logits.
    """
    logits = jnp.einsum("bmkh,blkh->bkml", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, _MASKED_LOGIT)  # (b, k, m, l)
    peak = jax.lax.stop_gradient(logits.max(axis=-1))  # (b, k, m); the result does not depend on it
    weights = jnp.exp(logits - peak[..., None])  # (b, k, m, l)
    out = jnp.einsum("bkml,blkh->bmkh", weights, v.astype(jnp.float32))  # (b, m, k, Dh)
    return out, peak, weights.sum(axis=-1)


def _merge(a, b):
    """Two unnormalised attentions over disjoint keys (`_block_attention`'s triples) -> the one over
    their union (online softmax): each part's sums are rescaled from its max to the larger max."""
    (out_a, peak_a, sum_a), (out_b, peak_b, sum_b) = a, b
    peak = jnp.maximum(peak_a, peak_b)  # (b, k, m)
    scale_a, scale_b = jnp.exp(peak_a - peak), jnp.exp(peak_b - peak)  # (b, k, m)
    as_out = lambda w: einops.rearrange(w, "b k m -> b m k 1")  # (b, m, k, 1)
    return out_a * as_out(scale_a) + out_b * as_out(scale_b), peak, sum_a * scale_a + sum_b * scale_b
