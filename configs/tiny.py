"""A tiny text-to-video run for tests and quick CPU checks: 2 frames of 16x16 moving shapes,
2 blocks of width 64, a few steps.

Run: python train.py --config configs/tiny.py --workdir runs/tiny
"""

from jaxdit import Config, DataConfig, ModelConfig, TextConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(variant="tiny/1x4x4", in_channels=3, text_dim=32),
        text=TextConfig(max_length=48, depth=1, heads=2),
        data=DataConfig(source="shapes", num_frames=2, size=16),
        train=TrainConfig(steps=4, batch_size=8, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=2, log_every=1),
    )
