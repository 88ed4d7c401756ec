import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.attention import attention, resolve_implementation


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


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fallback off GPU")
def test_auto_falls_back_to_xla_and_cudnn_off_gpu_is_an_error():
    assert resolve_implementation("auto", jnp.bfloat16, 64) == "xla"
    assert resolve_implementation("xla", jnp.float32, 64) == "xla"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_implementation("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_implementation("flash", jnp.bfloat16, 64)


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
