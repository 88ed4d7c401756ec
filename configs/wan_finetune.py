"""Fine-tune Wan 2.1 text-to-video 1.3B on your own videos, starting from its converted weights.

Convert the diffusers folder once, write a manifest of your clips (a CSV or JSONL with `path` and `text`
columns: docs/data.md), then train:

    python -m jaxdit.convert.wan Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_t2v_1.3b
    python train.py --config configs/wan_finetune.py --data.manifest my/videos.csv

The run (runs/wan_finetune/ unless --workdir says otherwise) starts from the EMA weights of
runs/wan21_t2v_1.3b (`train.init_from`, read when training starts) with a fresh optimizer, and takes
from it the model, the flow matching settings, the Wan VAE and umT5 (jaxdit/init_from.py). This file
sets the rest:
- data: clips of 480x832 at Wan's 16 fps, in two buckets: 81 frames (Wan's default video: 21 latent
  frames, 32,760 tokens) and 33 frames (9 latent frames, 14,040 tokens); a clip goes to the longest
  bucket it fills, and a video shorter than 33 frames at 16 fps is skipped;
- AdamW at 1e-5 after 100 warm-up steps, clipped at norm 1, a global batch of 8 clips; an EMA of
  decay 0.999 (about the last 1,000 steps: a fine-tune's length);
- the computation: bfloat16 activations (parameters and optimizer in float32), every block
  rematerialised, the blocks scanned (the import's unrolled blocks are stacked as they are read);
- a checkpoint and a sample video every 500 steps, sampled as Wan's pipeline (UniPC, 50 steps,
  guidance 5, 16 fps).
The global batch of 8 is one clip per device on 8 GPUs: XLA's estimate is 39 GiB a device for an 81-frame
clip, 16 GiB with --train.fsdp 8 (parameters, EMA and Adam moments split over 8 devices; docs/wan.md). The
14B model fine-tunes the same way with --train.init_from runs/wan21_t2v_14b --train.fsdp 8 (70.5 GiB a device).
"""

from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig, TrainConfig

WAN_FPS = 16.0  # Wan 2.1's frame rate, in training and in its videos


def get_config() -> Config:
    return Config(
        name="wan_finetune",
        # The architecture is the converted run's; these fields only say how it computes.
        model=ModelConfig(dtype="bfloat16", remat="full", scan_layers=True),
        diffusion=DiffusionConfig(process="flow"),  # Wan's; shift and prediction come from the converted run
        data=DataConfig(
            source="folder", manifest="videos/manifest.csv", buckets=((81, 480, 832), (33, 480, 832)), fps=WAN_FPS,
            num_workers=8,
        ),
        train=TrainConfig(
            steps=2000, batch_size=8, learning_rate=1e-5, warmup_steps=100, ema_decay=0.999, checkpoint_every=500,
            keep_checkpoints=2, log_every=10, init_from="runs/wan21_t2v_1.3b",
        ),
        sample=SampleConfig(
            sampler="unipc", steps=50, cfg_scale=5.0, fps=WAN_FPS, every=500,
            prompts=("A cat walks on the grass, realistic style",),
        ),
    )
