"""The default text-to-video model: DiT-S width over 1x2x2 spacetime patches of 4-channel latents.

Run: python train.py                      (this config, into runs/default/)
     python train.py --config configs/default.py --workdir runs/mine
"""

from jaxdit import Config, ModelConfig


def get_config() -> Config:
    return Config(
        name="default",
        model=ModelConfig(variant="S/1x2x2", in_channels=4, text_dim=256),
    )
