"""The default run: a small text-to-video model on the built-in moving shapes, in pixel space.

8 frames of 32x32 pixels are cut into 2x8x8 spacetime patches (64 tokens); a 4-block model of
width 128 with a 2-block byte-level text encoder learns colour and direction from the captions.
Trains on 2 CPU cores in about 6 minutes (2000 steps, ~100 samples/s).

Sample videos of PROMPTS are written to runs/shapes_tiny/samples/ every 500 steps and at the end.

Run: python train.py                         (this config, into runs/shapes_tiny/)
     python train.py --train.steps 4000      (longer; resumes where the last run stopped)
"""

from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig, TextConfig, TrainConfig

PROMPTS = (
    "a large red circle moving left",
    "a large blue square moving right",
    "a small green triangle moving up",
    "a large yellow circle moving down",
)


def get_config() -> Config:
    return Config(
        name="shapes_tiny",
        model=ModelConfig(variant="mini/2x8x8", in_channels=3, text_dim=64),
        diffusion=DiffusionConfig(prediction="x0"),
        text=TextConfig(max_length=48, depth=2, heads=4),
        data=DataConfig(source="shapes", num_frames=8, size=32),
        train=TrainConfig(
            steps=2000, batch_size=16, learning_rate=1e-3, warmup_steps=100, lr_schedule="cosine",
            ema_decay=0.995, checkpoint_every=500, log_every=50,
        ),
        sample=SampleConfig(prompts=PROMPTS, every=500, steps=50, cfg_scale=2.0),
    )
