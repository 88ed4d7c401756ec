"""Train on your own videos: a folder of video files and a CSV (or JSONL) manifest with `path`
(relative to the manifest) and `text` columns, as Open-Sora's CSVs.

    path,text
    clips/0001.mp4,a dog runs along a beach at sunset
    clips/0002.mp4,timelapse of clouds over a mountain

Copy this file, set `manifest` to your CSV, then preview the clips:
    python -m jaxdit.data.preview --config configs/video_folder.py --out grid.png
"""

from jaxdit import Config, DataConfig, ModelConfig


def get_config() -> Config:
    return Config(
        name="video_folder",
        model=ModelConfig(variant="S/1x2x2", in_channels=4, text_dim=256),
        data=DataConfig(source="folder", manifest="videos/manifest.csv", num_frames=16, size=64, frame_stride=2),
    )
