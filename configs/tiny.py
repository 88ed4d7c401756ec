"""A tiny text-to-video model for tests and quick CPU runs (2 blocks of width 64).

Run: python train.py --config configs/tiny.py --workdir runs/tiny
"""

from jaxdit import Config, ModelConfig


def get_config() -> Config:
    return Config(name="tiny", model=ModelConfig(variant="tiny/1x2x2", in_channels=4, text_dim=32))
