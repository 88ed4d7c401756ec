"""facebookresearch/DiT's forward pass written out in NumPy, over its own state_dict key names and
PyTorch layouts (Linear weights (out, in), Conv2d weights (D, C, p, p), images NCHW).

Written from the DiT paper and its models.py, independently of jaxdit, so that a test can check
that VideoDiT in its image configuration computes exactly DiT.
"""

import math

import numpy as np


def sincos_2d(dim, size):
    """DiT's get_2d_sincos_pos_embed: (size*size, dim), first half from the w coordinate."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))  # w first
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def timestep_features(t, half=128):
    """DiT's 256 timestep features, in float32 as DiT computes them (in float64 they differ by ~1e-5 at
    t = 999), with each frequency exp(float32 exponent) correctly rounded: a float32 exp's last bit
    depends on the library (torch's on CPU is one bit off in 3 of the 128, XLA's in more)."""
    exponents = (-math.log(10000) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)  # (half,)
    args = np.asarray(t).astype(np.float32)[:, None] * freqs  # (B, half) float32
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)  # (B, 2 half) float32


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _attention(sd, name, x, heads):
    b, n, d = x.shape
    qkv = _linear(sd, f"{name}.qkv", x).reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv  # each (B, heads, N, head_dim)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return _linear(sd, f"{name}.proj", out)


def dit_forward(sd, x, t, y, *, patch, heads, depth):
    """x (B, C, H, W), t (B,), y (B,) -> (B, C_out, H, W), as DiT.forward."""
    b, c, h, w = x.shape
    weight = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    d = weight.shape[0]
    patches = x.reshape(b, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5)
    tokens = patches.reshape(b, -1, c * patch * patch) @ weight.reshape(d, -1).T + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"][0]

    t_freq = timestep_features(t).astype(np.float64)
    t_emb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", t_freq)))
    cond = t_emb + sd["y_embedder.embedding_table.weight"][y]

    for i in range(depth):
        name = f"blocks.{i}"
        mods = np.split(_linear(sd, f"{name}.adaLN_modulation.1", _silu(cond)), 6, axis=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        tokens = tokens + gate_msa[:, None] * _attention(
            sd, f"{name}.attn", _modulate(_layer_norm(tokens), shift_msa, scale_msa), heads
        )
        hidden = _gelu_tanh(_linear(sd, f"{name}.mlp.fc1", _modulate(_layer_norm(tokens), shift_mlp, scale_mlp)))
        tokens = tokens + gate_mlp[:, None] * _linear(sd, f"{name}.mlp.fc2", hidden)

    shift, scale = np.split(_linear(sd, "final_layer.adaLN_modulation.1", _silu(cond)), 2, axis=1)
    out = _linear(sd, "final_layer.linear", _modulate(_layer_norm(tokens), shift, scale))
    c_out = out.shape[-1] // (patch * patch)
    out = out.reshape(b, h // patch, w // patch, patch, patch, c_out)
    return np.einsum("nhwpqc->nchpwq", out).reshape(b, c_out, h, w)
