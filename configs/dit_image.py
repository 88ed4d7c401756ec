"""DiT's class-conditional ImageNet model: 1 frame, patch 1x2x2, 4 latent channels, 1000 classes,
learned variance. With variant XL/2 this is DiT-XL/2 (675M parameters).

Run: python train.py --config configs/dit_image.py --model.variant B/2
"""

from jaxdit import Config, ModelConfig


def get_config() -> Config:
    return Config(
        name="dit_image",
        model=ModelConfig(variant="XL/2", in_channels=4, num_classes=1000, learn_sigma=True),
    )
