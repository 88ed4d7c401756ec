"""A video autoencoder for the built-in moving shapes: the codec a latent DiT trains on.

8 frames of 32x32 pixels -> latents of 8 frames x 8x8 x 8 channels (4x spatial compression,
time kept; MSE reconstruction, which escapes the all-black solution that L1 finds on these mostly
black clips). Trains on 2 CPU cores in about 4 minutes (~5 steps/s); the held-out PSNR, original |
reconstruction videos and the frozen codec (workdir/codec/) are written every 400 steps and at the end.

Run: python train.py --config configs/codec_shapes.py               (into runs/codec_shapes/)
Then: python train.py --config configs/shapes_latent.py             (a DiT on its latents)
"""

from jaxdit import AutoencoderConfig, Config, DataConfig, SampleConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="codec_shapes",
        task="codec",
        # 4x4 pixels to channels, then one level of width 32: cheap enough for a CPU.
        autoencoder=AutoencoderConfig(channels=(32,), patch=4, latent_channels=8, reconstruction="mse", eval_clips=64),
        data=DataConfig(source="shapes", num_frames=8, size=32, caption_dropout=0.0),
        train=TrainConfig(
            steps=1200, batch_size=8, learning_rate=2e-3, warmup_steps=50, lr_schedule="cosine",
            ema_decay=0.99, checkpoint_every=400, log_every=50,
        ),
        sample=SampleConfig(every=400),
    )
