"""The default run: a small text-to-video model on the built-in moving shapes, in pixel space, on clips
of several shapes and on images, and prompted with images and clips.

Four buckets (jaxdit.data.buckets), one shape per step: 8 frames of 32x32 (square), 32x48 (landscape)
and 48x32 (portrait) pixels, and still images (32x32); a token budget of 512 a step gives batches of 8,
5, 5 and 32. Stills take 46% of the steps: a still shows a shape in 16 tokens where a clip spends 64-96
on one, and what the videos lack most is the shape (docs/quality.md). The clips are cut into 2x8x8
spacetime patches (64 tokens for the square) for a 4-block model of width 128, conditioned by adaLN-Zero
on the timestep and the pooled caption of a 1-block byte-level text encoder; an image's one frame is
repeated to fill the 2-frame patch. Frame conditioning (jaxdit.frames): a share of the clips is trained
with frames given (mostly the first: image-to-video; also the last, both, or a leading or trailing clip
of 2 frames), so the run can be prompted with an image or a clip.

The recipe (docs/quality.md, "The recipe, and why each part is there"): flow matching that predicts the
clean clip (x0, velocity loss), logit-normal times shifted toward noise (s = 3); 3-D rotary positions
with QK-norm, which let the tokens of one clip agree on one object, plus sin-cos positions, from which
the prediction at pure noise draws a layout that moves; the input scaled by its signal share (1 - t), so
that noise does not drown those positions; and a hashed bag of caption bigrams in the pooled caption, so
that the direction word reaches the condition vector as strongly as the colour word. The clips hold one
object, whose four words the pooled caption carries whole, so the blocks have no cross-attention to the
text tokens (configs/shapes.py, with two objects, keeps it). AdamW at 3e-3 and beta2 0.95, guidance 2.
About 13.5 minutes for the whole command on 2 CPU cores (docs/quality.md, "The default run").

Sample videos of PROMPTS are written to runs/shapes_tiny/samples/ every 2000 steps and at the end
(step_N.png, .mp4), with the landscape, portrait, still and image-to-video examples labelled in
step_N_sizes.png, and the prompt-adherence rates of 16 fixed prompts logged beside the loss.

Run: python train.py                         (this config, into runs/shapes_tiny/)
     python train.py --train.steps 20000     (longer; resumes where the last run stopped)
"""

from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig, TextConfig, TrainConfig

# Square first (what sample.py makes by default, and what is judged while training), then landscape,
# portrait, and still images (one frame, a still clip of two to the 2-frame temporal patch).
BUCKETS = ((8, 32, 32), (8, 32, 48), (8, 48, 32), (1, 32, 32))
# Every clip is drawn for a bucket at random, then kept with its bucket's probability: stills take about
# 46% of the steps (batches of 32), the square 12% and the landscape and portrait 21% each.
BUCKET_KEEP = (0.07, 0.07, 0.07, 1.0)
PROMPTS = (
    "a large red circle moving left",
    "a large blue square moving right",
    "a small green triangle moving up",
    "a large yellow circle moving down",
)


def get_config() -> Config:
    return Config(
        name="shapes_tiny",
        model=ModelConfig(
            variant="mini/2x8x8", in_channels=3, text_dim=64, cross_attention=False, positions="rope+sincos",
            qk_norm=True, flow_input_scale=True, frame_condition=True,
        ),
        diffusion=DiffusionConfig(process="flow", prediction="x0", time_sampling="logit_normal", shift=3.0),
        text=TextConfig(max_length=48, depth=1, heads=4, bigram_buckets=4096),
        data=DataConfig(
            source="shapes", num_frames=8, size=32, buckets=BUCKETS, bucket_tokens=512, bucket_keep=BUCKET_KEEP
        ),
        train=TrainConfig(
            steps=11500, batch_size=8, learning_rate=3e-3, adam_b2=0.95, warmup_steps=100, lr_schedule="cosine",
            ema_decay=0.995, checkpoint_every=1000, log_every=50,
            condition="first=0.15,last=0.025,first_last=0.025,lead=0.025,trail=0.025", condition_frames=2,
        ),
        sample=SampleConfig(prompts=PROMPTS, every=2000, steps=50, cfg_scale=2.0, judge_prompts=16),
    )
