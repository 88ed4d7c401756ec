import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import attention as attention_module
from jaxdit.attention import attention, resolve_implementation
from jaxdit.sharding import make_mesh


def reference(q, k, v, mask):
    logits = np.einsum("bnkh,blkh->bknl", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bknl,blkh->bnkh", weights, v)


def test_masked_attention_matches_softmax_over_valid_keys():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 6, 3, 8))  # (B, N, K, Dh)
    k, v = jax.random.normal(kk, (2, 5, 3, 8)), jax.random.normal(kv, (2, 5, 3, 8))  # (B, L, K, Dh)
    mask = jnp.array([[True, True, False, True, False], [True] * 5])
    out = jax.jit(lambda q, k, v, m: attention(q, k, v, mask=m, implementation="xla"))(q, k, v, mask)
    np.testing.assert_allclose(out, reference(*map(np.asarray, (q, k, v, mask))), atol=1e-5)
    unmasked = attention(q, k, v)
    np.testing.assert_allclose(unmasked, reference(*map(np.asarray, (q, k, v, jnp.ones((2, 5), bool)))), atol=1e-5)


def test_rows_with_every_key_masked_return_zeros():
    q = k = v = jnp.ones((2, 4, 2, 8))
    out = attention(q, k, v, mask=jnp.array([[False] * 4, [True] * 4]))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_xla_attention_and_its_backward_match_jax_dot_product_attention(dtype, atol):
    """The "xla" path's hand-written backward against autodiff of jax's own attention, masked."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (2, 7, 3, 16), dtype)  # (B, N, K, Dh)
    k, v = jax.random.normal(kk, (2, 5, 3, 16), dtype), jax.random.normal(kv, (2, 5, 3, 16), dtype)  # (B, L, K, Dh)
    d_out = jax.random.normal(kd, q.shape, dtype)  # a cotangent that weighs every output
    mask = jnp.array([[True, False, True, True, False], [True] * 5])

    def jax_attention(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation="xla")

    def ours(q, k, v, mask):
        return attention(q, k, v, mask=mask, implementation="xla")

    (want, want_vjp), (got, got_vjp) = (jax.vjp(functools.partial(fn, mask=mask), q, k, v) for fn in (jax_attention, ours))
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(got), f32(want), atol=atol)
    for name, g, w in zip("qkv", got_vjp(d_out), want_vjp(d_out), strict=True):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(f32(g), f32(w), atol=atol * 4, err_msg=f"d{name}")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fallback off GPU")
def test_auto_falls_back_to_xla_and_cudnn_off_gpu_is_an_error():
    assert resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
    assert resolve_implementation("xla", jnp.float32, 64) == "xla"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_implementation("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_implementation("flash", jnp.bfloat16, 64)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the fallback off TPU")
def test_auto_is_xla_and_splash_is_an_error_off_tpu():
    assert resolve_implementation("auto", jnp.float32, 64, (256, 128)) == "xla"
    with pytest.raises(ValueError, match="model.attention='splash' needs a TPU.*backend=cpu.*Use 'auto' or 'xla'"):
        resolve_implementation("splash", jnp.float32, 64, (256, 128))


def test_splash_rules_on_a_tpu_backend(monkeypatch):
    """Only the platform is pretended (a TPU with 8 devices, then 1): the rules decide as on a TPU.
    Any lengths run (they are padded); several devices need the trace's mesh to place the kernel."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert resolve_implementation("auto", jnp.bfloat16, 64, (256, 128)) == "xla"  # no mesh: jit cannot split it
    with pytest.raises(ValueError, match=r"one device or a trace on the device mesh.*8 devices, mesh of the trace None"):
        resolve_implementation("splash", jnp.bfloat16, 64, (256, 128))
    with jax.sharding.use_abstract_mesh(make_mesh(2, context=2).abstract_mesh):
        assert resolve_implementation("auto", jnp.bfloat16, 64, (32_760, 77)) == "splash"  # Wan's 480p x 81 frames
        assert resolve_implementation("splash", jnp.float32, 64) == "splash"
        assert resolve_implementation("auto", jnp.float16, 64) == "xla"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert resolve_implementation("auto", jnp.bfloat16, 72, (256, 128)) == "splash"
    assert resolve_implementation("auto", jnp.bfloat16, 64, (150, 77)) == "splash"  # 77 text tokens
    assert resolve_implementation("auto", jnp.float16, 64, (256, 128)) == "xla"
    with pytest.raises(ValueError, match=r"float32/bfloat16 compute.*dtype=float16"):
        resolve_implementation("splash", jnp.float16, 64, (256, 77))


@pytest.fixture
def interpreted_splash(monkeypatch):
    """Run the real splash kernel in Pallas's interpreter, on CPU."""
    monkeypatch.setattr(attention_module, "_SPLASH_INTERPRET", True)


def test_splash_kernel_matches_xla_self_attention(interpreted_splash):
    q, k, v = (jax.random.normal(key, (2, 128, 2, 72)) for key in jax.random.split(jax.random.key(1), 3))  # Dh as XL's

    def loss(q, k, v, impl):
        out = attention(q, k, v, implementation=impl)  # (B, N, K, Dh)
        return (out**2).sum(), out

    # The gradients go through the kernel's own backward pass.
    grads_and_out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    (splash_grads, splash), (xla_grads, xla) = (grads_and_out(q, k, v, impl) for impl in ("splash", "xla"))
    np.testing.assert_allclose(splash, xla, atol=1e-5)
    for got, want in zip(splash_grads, xla_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_splash_kernel_matches_xla_masked_cross_attention(interpreted_splash):
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (3, 256, 2, 16))  # (B, N, K, Dh): video tokens
    k, v = jax.random.normal(kk, (3, 128, 2, 16)), jax.random.normal(kv, (3, 128, 2, 16))  # (B, L, K, Dh): text
    mask = jnp.arange(128)[None] < jnp.array([[128], [5], [0]])  # (B, L): all valid, 5 tokens, no text
    run = jax.jit(lambda q, k, v, m, impl: attention(q, k, v, mask=m, implementation=impl), static_argnums=4)
    splash = run(q, k, v, mask, "splash")
    np.testing.assert_allclose(splash, run(q, k, v, mask, "xla"), atol=1e-5)
    np.testing.assert_array_equal(splash[2], 0.0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on GPU only")
def test_cudnn_matches_xla_in_bfloat16():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 256, 4, 64), jnp.bfloat16) for key in (kq, kk, kv))
    mask = jnp.arange(256)[None] < jnp.array([[256], [100]])
    assert resolve_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    for m in (None, mask):
        cudnn = attention(q, k, v, mask=m, implementation="cudnn").astype(jnp.float32)
        xla = attention(q, k, v, mask=m, implementation="xla").astype(jnp.float32)
        np.testing.assert_allclose(cudnn, xla, atol=2e-2)


def test_cudnn_path_pads_odd_lengths_without_changing_outputs_or_gradients(monkeypatch):
    """cuDNN's masked training kernels refuse odd lengths (77 text tokens): the "cudnn" path pads them.
    Checked on any backend by running that path's padding around jax's XLA attention."""
    original = jax.nn.dot_product_attention
    seen = []

    def even_lengths_only(q, k, v, *, mask, implementation):
        assert implementation == "cudnn"
        seen.append((q.shape[1], k.shape[1]))
        return original(q, k, v, mask=mask, implementation="xla")

    kq, kk, kv, kd = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(kq, (2, 9, 2, 8))  # (B, N, K, Dh), N odd
    k, v = (jax.random.normal(key, (2, 7, 2, 8)) for key in (kk, kv))  # (B, L, K, Dh), L odd
    d_out = jax.random.normal(kd, q.shape)
    mask = jnp.array([[True] * 7, [True, True, True, False, False, False, False]])

    def vjp(implementation):
        out, pullback = jax.vjp(lambda *a: attention_module._dot_product_attention(*a, mask, implementation), q, k, v)
        return (out, *pullback(d_out))

    want = vjp("xla")
    monkeypatch.setattr(jax.nn, "dot_product_attention", even_lengths_only)
    got = vjp("cudnn")
    assert seen and all(n % 2 == 0 and length % 2 == 0 for n, length in seen)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on GPU only")
@pytest.mark.parametrize("keys", [256, 77], ids=["self", "cross"])
def test_cudnn_gradients_match_xla_in_bfloat16(keys):
    """The backward pass that training runs: self-attention, and cross-attention to masked text tokens."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (2, 256, 4, 64), jnp.bfloat16)  # (B, N, K, Dh)
    k, v = (jax.random.normal(key, (2, keys, 4, 64), jnp.bfloat16) for key in (kk, kv))  # (B, L, K, Dh)
    d_out = jax.random.normal(kd, q.shape, jnp.bfloat16)
    mask = jnp.arange(keys)[None] < jnp.array([[keys], [keys // 3]])  # (B, L)

    def vjp(implementation):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask=mask, implementation=implementation), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *pullback(d_out))]

    for name, got, want in zip(("out", "dq", "dk", "dv"), vjp("cudnn"), vjp("xla"), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, atol=2e-2, err_msg=name)


@pytest.mark.skipif(
    jax.default_backend() != "tpu" or jax.device_count() != 1, reason="the splash kernel on a single TPU device"
)
def test_splash_matches_xla_in_bfloat16_on_tpu():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 1000, 4, 64), jnp.bfloat16)  # (B, N, K, Dh): padded to 1024
    k, v = (jax.random.normal(key, (2, 77, 4, 64), jnp.bfloat16) for key in (kk, kv))  # (B, L, K, Dh): to 128
    mask = jnp.arange(77)[None] < jnp.array([[77], [40]])
    assert resolve_implementation("auto", jnp.bfloat16, 64, (1000, 77)) == "splash"
    for m in (None, mask):
        splash = attention(q, k, v, mask=m, implementation="splash").astype(jnp.float32)
        xla = attention(q, k, v, mask=m, implementation="xla").astype(jnp.float32)
        np.testing.assert_allclose(splash, xla, atol=2e-2)
