"""Moving shapes on one GPU: 16 frames of 64x64 pixels, a DiT-S model in bfloat16.

16x64x64 pixels in 2x4x4 spacetime patches are 2048 tokens; DiT-S (width 384, 12 blocks) with a
2-block text encoder. The default run's recipe, scaled up: flow matching predicting the clean clip
(x0, velocity loss) with logit-normal times, rotary plus sin-cos positions, QK-norm, the input scaled
by its signal share and a bag of caption bigrams (configs/shapes_tiny.py; not yet run on a GPU:
with two objects the bag says which words occur, and cross-attention which object each belongs to). The time shift grows with
the token count as SD3's sqrt rule: 3 at 256 tokens (8x fewer values than here: the default run's
clips), sqrt(8) x 3 = 8.5 here. AdamW with beta2 0.95, as the default run, at the default run's 3e-3
scaled by its width over this one (128 / 384: 1e-3, the muP rule for Adam). 64 fixed prompts are judged
at every sample step.

Run: python train.py --config configs/shapes.py
     python train.py --config configs/shapes.py --train.batch_size 128 --model.remat dots
"""

from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig, TextConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="shapes",
        model=ModelConfig(
            variant="S/2x4x4", in_channels=3, text_dim=256, dtype="bfloat16", positions="rope+sincos", qk_norm=True,
            flow_input_scale=True,
        ),
        diffusion=DiffusionConfig(
            process="flow", prediction="x0", time_sampling="logit_normal", shift=3.0, shift_reference_tokens=256
        ),
        text=TextConfig(max_length=128, depth=2, heads=4, bigram_buckets=4096),
        data=DataConfig(source="shapes", num_frames=16, size=64, max_objects=2, num_workers=4),
        train=TrainConfig(
            steps=50_000, batch_size=64, learning_rate=1e-3, adam_b2=0.95, warmup_steps=1000, lr_schedule="cosine",
            ema_decay=0.9999, checkpoint_every=2000, log_every=100,
        ),
        sample=SampleConfig(
            prompts=(
                "a large red circle moving left",
                "a small blue square moving up and a large yellow triangle moving right",
                "a large white square moving down",
                "a small magenta circle moving right and a small green triangle moving left",
            ),
            every=5000, num_samples=2, judge_prompts=64,
        ),
    )
