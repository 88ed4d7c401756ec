"""VideoDiT as a class-conditional image model computes exactly facebookresearch/DiT."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdit
from tests.dit_reference import dit_forward, sincos_2d
from tests.helpers import pure_forward, randomized


def official_state_dict(model: jaxdit.VideoDiT) -> dict[str, np.ndarray]:
    """The model's parameters under DiT's key names and PyTorch layouts."""
    cfg = model.config
    _, ph, pw = cfg.patch
    sd = {}

    def linear(name, layer):
        sd[f"{name}.weight"] = np.asarray(layer.kernel[...]).T
        sd[f"{name}.bias"] = np.asarray(layer.bias[...])

    kernel = np.asarray(model.patch_embed.kernel[...]).reshape(ph, pw, cfg.in_channels, cfg.width)
    sd["x_embedder.proj.weight"] = kernel.transpose(3, 2, 0, 1)  # (D, C, p, p)
    sd["x_embedder.proj.bias"] = np.asarray(model.patch_embed.bias[...])
    linear("t_embedder.mlp.0", model.t_embed.mlp.fc1)
    linear("t_embedder.mlp.2", model.t_embed.mlp.fc2)
    sd["y_embedder.embedding_table.weight"] = np.asarray(model.label_embed.table.embedding[...])
    for i, block in enumerate(model.blocks):
        linear(f"blocks.{i}.attn.qkv", block.attn.qkv)
        linear(f"blocks.{i}.attn.proj", block.attn.proj)
        linear(f"blocks.{i}.mlp.fc1", block.mlp.fc1)
        linear(f"blocks.{i}.mlp.fc2", block.mlp.fc2)
        linear(f"blocks.{i}.adaLN_modulation.1", block.modulation)
    linear("final_layer.adaLN_modulation.1", model.final.modulation)
    linear("final_layer.linear", model.final.linear)
    return sd


def test_image_model_matches_the_reference_dit():
    config = jaxdit.ModelConfig.from_variant("tiny/2", in_channels=4, num_classes=10, learn_sigma=True)
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)), scale=0.1)
    size = 8
    kx, kt, ky = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (3, 1, size, size, 4))  # (B, T=1, H, W, C)
    t = jax.random.randint(kt, (3,), 0, 1000)
    y = jnp.array([0, 7, 10])  # 10 is the null label

    ours = pure_forward(model)(x, t, label=y)  # (B, 1, H, W, 2C)

    sd = official_state_dict(model)
    sd["pos_embed"] = sincos_2d(config.width, size // 2)[None]
    x_nchw = np.asarray(x[:, 0]).transpose(0, 3, 1, 2).astype(np.float64)
    reference = dit_forward(sd, x_nchw, np.asarray(t), np.asarray(y), patch=2, heads=config.heads, depth=config.depth)
    assert np.abs(reference).max() > 0.1  # weights are random: the comparison is not of zeros
    np.testing.assert_allclose(np.asarray(ours[:, 0]).transpose(0, 3, 1, 2), reference, rtol=1e-4, atol=1e-4)
