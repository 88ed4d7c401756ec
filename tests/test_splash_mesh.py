"""The splash kernel at lengths that are not multiples of 128 (padded, with segment ids) and on a
(data, fsdp, context) mesh, run in Pallas's interpreter on CPU: outputs and gradients on the real
tokens equal XLA attention's.

Sizes are tiny (the interpreter runs the kernel's grid as a loop): 150 video tokens (Wan's 32,760
is not a multiple of 128 either), 24 text tokens, 4 heads of 8 channels, 2 clips. Each test
compiles one program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import attention as attention_module
from jaxdit import context_parallel
from jaxdit.attention import attention
from jaxdit.sharding import make_mesh

B, N, L, K, DH = 2, 150, 24, 4, 8  # clips, video tokens, text tokens, heads, head width
VIDEO_KEYS = jnp.arange(N)[None] < jnp.array([[N], [120]])  # (B, N): the second clip's last 30 keys masked
TEXT_KEYS = jnp.arange(L)[None] < jnp.array([[9], [0]])  # (B, L): a 9-token caption, then none at all
TOLERANCE = 1e-5  # float32: the kernel sums in another order


@pytest.fixture(autouse=True)
def interpreted_splash(monkeypatch):
    """Run the real splash kernel in Pallas's interpreter, on CPU."""
    monkeypatch.setattr(attention_module, "_SPLASH_INTERPRET", True)


@pytest.fixture(scope="module")
def inputs():
    """Video q, k, v (B, N, K, Dh), text k, v (B, L, K, Dh) and a cotangent w for the output."""
    keys = jax.random.split(jax.random.key(0), 6)
    video = tuple(jax.random.normal(key, (B, N, K, DH)) for key in keys[:3])
    text = tuple(jax.random.normal(key, (B, L, K, DH)) for key in keys[3:5])
    return video, text, jax.random.normal(keys[5], (B, N, K, DH))


def value_and_grads(attend, q, k, v, w):
    """attend(q, k, v) and the gradients of sum(attend(q, k, v) * w) in q, k and v."""
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(w)


def self_and_cross(implementation: str, video, text, w, *, context_parallel_self: bool = False):
    """Masked self-attention of the video tokens and their cross-attention to the text, with gradients.

    context_parallel_self: the self-attention runs as the model's does on a context axis (Ulysses,
    the tokens padded to a multiple of the context size and the padding masked), else as `attention()`.
    """
    q, k, v = video

    def self_attend(q, k, v):
        if not context_parallel_self:
            return attention(q, k, v, mask=VIDEO_KEYS, implementation=implementation)  # (B, N, K, Dh)
        n = N + (-N % context_parallel.context_size())
        pad = lambda x: jnp.pad(x, ((0, 0), (0, n - N), (0, 0), (0, 0)))  # (B, N', K, Dh)
        mask = jnp.pad(VIDEO_KEYS, ((0, 0), (0, n - N)))  # (B, N'): the padding is never attended to
        out = context_parallel.self_attention(
            pad(q), pad(k), pad(v), mask=mask, mode="ulysses", implementation=implementation
        )  # (B, N', K, Dh)
        return out[:, :N]  # (B, N, K, Dh)

    def cross_attend(q, k, v):
        return context_parallel.cross_attention(q, k, v, mask=TEXT_KEYS, implementation=implementation)

    return value_and_grads(self_attend, q, k, v, w), value_and_grads(cross_attend, q, *text, w)


@pytest.fixture(scope="module")
def reference(inputs):
    """XLA attention on one device, unpadded."""
    return jax.jit(lambda *a: self_and_cross("xla", *a))(*inputs)


def assert_close(got, want):
    for name, g, r in zip(("self", "cross"), got, want, strict=True):
        for part, a, b in zip(("out", "dq", "dk", "dv"), (g[0], *g[1]), (r[0], *r[1]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOLERANCE, err_msg=f"{name} {part}")


def test_padded_splash_equals_xla_on_one_device(inputs, reference):
    """150 queries and keys, 24 text keys: padded to 256 and 128, the padding and the masked keys
    never attended, a caption with no token at all still gives zeros."""
    got = jax.jit(lambda *a: self_and_cross("splash", *a))(*inputs)
    assert_close(got, reference)
    np.testing.assert_array_equal(got[1][0][1], 0.0)  # the clip without text: cross-attention is zero
    assert np.abs(np.asarray(got[0][1][1])).max() > 0  # the keys' gradients are not trivially zero


@pytest.mark.parametrize("mesh_shape", [(1, 1, 4), (2, 1, 2)], ids=str)
def test_splash_on_a_mesh_equals_xla(inputs, reference, mesh_shape):
    """Jit over a (data, fsdp, context) mesh: Ulysses self-attention runs the kernel inside its
    shard_map, cross-attention inside its own, and a plain `attention()` over the mesh (as the text
    encoder's) in `_splash`'s shard_map over the batch (data) and the heads (context)."""
    data, fsdp, context = mesh_shape
    mesh = make_mesh(fsdp, devices=jax.devices()[: data * fsdp * context], context=context)

    def on_mesh(video, text, w):
        ulysses = self_and_cross("splash", video, text, w, context_parallel_self=True)
        plain = self_and_cross("splash", video, text, w)[0]
        return ulysses, plain

    replicated = jax.device_put(inputs, jax.NamedSharding(mesh, jax.P()))
    ulysses, plain = jax.jit(context_parallel.traced_on(mesh, on_mesh))(*replicated)
    assert_close(ulysses, reference)
    assert_close((plain, ulysses[1]), reference)
