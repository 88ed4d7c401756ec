"""The default moving-shapes DiT, trained on the latents of a frozen video autoencoder.

Train the codec first (a few minutes on CPU), then the DiT on its latents (8 frames x 8x8 x 8):

    python train.py --config configs/codec_shapes.py        # -> runs/codec_shapes (the frozen codec in codec/)
    python train.py --config configs/shapes_latent.py       # -> runs/shapes_latent, decoded sample videos

Or encode the clips once and train from the cache (no encoding in the training step):

    python -m jaxdit.data.latent_cache --config configs/shapes_latent.py --out caches/shapes_latent --num-clips 32000
    python train.py --config configs/shapes_latent.py --data.source cache --data.cache caches/shapes_latent
"""

import dataclasses
import pathlib

from jaxdit import CodecConfig, Config, load_config


def get_config() -> Config:
    base = load_config(pathlib.Path(__file__).with_name("shapes_tiny.py"))
    return dataclasses.replace(
        base,
        name="shapes_latent",
        codec=CodecConfig(kind="saved", path="runs/codec_shapes"),
        # 8x8x8x8 latents in 2x2x2 patches: 64 tokens of 64 values, fewer than the model's width, so
        # the network predicts the velocity itself; the rest of the default recipe is kept.
        model=dataclasses.replace(base.model, variant="mini/2x2x2", in_channels=8),
        diffusion=dataclasses.replace(base.diffusion, prediction="v"),
    )
