"""Train on your own videos: a folder of video files and a CSV (or JSONL) manifest with `path`
(relative to the manifest) and `text` columns, as Open-Sora's CSVs.

    path,text
    clips/0001.mp4,a dog runs along a beach at sunset
    clips/0002.mp4,timelapse of clouds over a mountain

Copy this file, set `manifest` to your CSV, then preview the clips and train:
    python -m jaxdit.data.preview --config configs/video_folder.py --out grid.png
    python train.py --config configs/video_folder.py --data.manifest my/videos.csv

Until a latent codec is trained for your data (the codec issue), the model works on pixels:
16x64x64 frames in 2x4x4 patches (2048 tokens), predicting the clean clip.
"""

from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="video_folder",
        model=ModelConfig(variant="S/2x4x4", in_channels=3, text_dim=256, dtype="bfloat16"),
        diffusion=DiffusionConfig(prediction="x0"),
        data=DataConfig(
            source="folder", manifest="videos/manifest.csv", num_frames=16, size=64, frame_stride=2, num_workers=8
        ),
        train=TrainConfig(
            steps=100_000, batch_size=64, learning_rate=1e-4, warmup_steps=1000, checkpoint_every=2000, log_every=100
        ),
    )
