"""Configs: frozen dataclasses and the table of model sizes.

A model size is named by a variant string, "<size>/<patch>", as in DiT's `DiT_models`:
`"XL/1x2x2"` is DiT-XL (width 1152, depth 28, 16 heads) over spacetime patches of 1 frame
by 2x2 pixels. `"XL/2"` is short for `"XL/1x2x2"`, DiT's image patch.

Config files (`configs/*.py`) define `get_config()` returning a `Config`; `load_config` reads one.
"""

import dataclasses
import importlib.util
import math
import pathlib
import re

# size name -> (width, depth, heads). S/B/L/XL are DiT's; "tiny" is for tests and CPU demos.
VARIANTS = {
    "tiny": (64, 2, 4),
    "mini": (128, 4, 4),  # the default CPU demo (configs/shapes_tiny.py)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

DTYPES = ("float32", "bfloat16", "float16")
# the built-in moving shapes, videos listed in a manifest, or latents encoded once (jaxdit.data.latent_cache)
DATA_SOURCES = ("shapes", "folder", "cache")
# "auto": cuDNN flash attention on GPU with 16-bit compute; "splash", jax's Pallas splash-attention
# kernel, on a single-device TPU when the sequence lengths are multiples of 128; XLA everywhere
# else. The rules are jaxdit.attention.resolve_implementation's.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# How tokens know where they are: fixed 3-D sin-cos embeddings added to the tokens (DiT; what its
# imported checkpoints need), 3-D rotary angles inside self-attention (Wan, HunyuanVideo, Open-Sora 2.0),
# or both: rotary offsets between tokens, and the absolute place of each, which a prediction made
# from pure noise (a layout that moves across the clip) can only come from.
POSITIONS = ("sincos", "rope", "rope+sincos")
# How self-attention runs when the video tokens are split over the mesh's `context` axis
# (train.context > 1; jaxdit.context_parallel): "ulysses" all-to-alls the sequence shards into head
# shards (the heads must divide by the context size); "ring" passes K/V blocks around the devices (any
# head count); "ulysses_ring" (USP) does Ulysses within groups of model.ulysses_degree devices and a
# ring across the groups.
CONTEXT_ATTENTION = ("ulysses_ring", "ulysses", "ring")
# The mesh axis over which video tokens are split along the sequence (jaxdit.sharding builds the mesh).
CONTEXT_AXIS = "context"
# What a block keeps for the backward pass: everything, nothing (recompute the block),
# or only the matmul outputs.
REMAT_POLICIES = ("none", "full", "dots")
NOISE_SCHEDULES = ("linear", "cosine")  # beta schedules of the forward process (DiT: linear)
# The forward process: DDPM's discrete noising steps (DiT), or flow matching's straight path
# x_t = (1 - t) x0 + t eps over continuous t (rectified flow: SD3, Open-Sora 2.0).
PROCESSES = ("ddpm", "flow")
# What the network predicts: the noise (DiT), the velocity v (DDPM: a*eps - s*x0; flow: eps - x0),
# or the clean sample x0 (for pixel-space models whose patches have more dimensions than the model's width).
PREDICTIONS = ("epsilon", "v", "x0")
TIME_SAMPLINGS = ("uniform", "logit_normal")  # how flow training draws t in (0, 1)
LR_SCHEDULES = ("constant", "cosine")  # after the linear warm-up
# identity: the model works on pixels scaled to [-1, 1]; saved: the frozen codec in codec.path
CODECS = ("identity", "saved")
RECONSTRUCTION_LOSSES = ("l1", "mse")
# byte: UTF-8 bytes and a small encoder trained with the DiT; t5: a frozen pretrained T5 / umT5 (jaxdit.t5)
TEXT_ENCODERS = ("byte", "t5")
TASKS = ("dit", "codec")  # what train.py trains: the diffusion transformer, or a video autoencoder (a codec)
# Each process's samplers, its default first: DDIM (deterministic at eta 0) or ancestral DDPM
# for DDPM runs; Euler or Heun (2nd order) ODE integration for flow runs.
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun")}

def resolve_sampler(sampler: str, process: str) -> str:
    """The sampler that runs ("": the process's default), or an error naming the process's samplers."""
    if not sampler:
        return SAMPLERS[process][0]
    if sampler not in SAMPLERS[process]:
        known = sum(SAMPLERS.values(), ())
        raise ValueError(
            f"unknown sampler {sampler!r}; use one of {', '.join(known)}." if sampler not in known else
            f"sampler {sampler!r} does not sample a {process} run; use one of {', '.join(SAMPLERS[process])} "
            f"(diffusion.process={process!r})."
        )
    return sampler


def context_degrees(mode: str, heads: int, context: int, ulysses_degree: int = 0) -> tuple[int, int]:
    """How `context` devices split a self-attention of `heads` heads: (Ulysses degree u, ring degree r),
    u * r = context. Ulysses gives each device heads / u of the heads, so u must divide them.

    ulysses: (context, 1); ring: (1, context); ulysses_ring: u = ulysses_degree, or gcd(heads, context) when 0.
    """
    if mode == "ring" or context == 1:
        return 1, context
    if mode == "ulysses":
        if heads % context:
            raise ValueError(
                f"model.context_attention='ulysses' gives each of the {context} devices of the context axis "
                f"(train.context) an equal share of the heads, so the {heads} heads must be divisible by "
                f"{context}. Use model.context_attention='ring' (any head count) or 'ulysses_ring' "
                f"(Ulysses over gcd(heads, context) = {math.gcd(heads, context)} devices, a ring across them), "
                "or a context size that divides the heads."
            )
        return context, 1
    ulysses = ulysses_degree or math.gcd(heads, context)
    if heads % ulysses or context % ulysses:
        raise ValueError(
            f"model.ulysses_degree={ulysses} must divide both the {heads} heads and train.context={context}; "
            f"use 0 for gcd(heads, context) = {math.gcd(heads, context)}."
        )
    return ulysses, context // ulysses


class ConfigError(ValueError):
    """A config that cannot run here (e.g. a batch that does not split over the devices)."""


_PATCH = re.compile(r"^(\d+)(?:x(\d+)x(\d+))?$")


def parse_variant(variant: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """`"B/2x4x4"` -> ((width, depth, heads), (pt, ph, pw)); `"B/2"` means patch (1, 2, 2)."""
    size, _, patch = variant.partition("/")
    match = _PATCH.match(patch)
    if size not in VARIANTS or match is None:
        raise ValueError(
            f"model.variant {variant!r} is not a known variant: write <size>/<patch> with size one "
            f"of {', '.join(VARIANTS)} and patch 'P' (image, 1xPxP) or 'PTxPHxPW', e.g. 'XL/1x2x2'."
        )
    pt, ph, pw = (1, int(match[1]), int(match[1])) if match[2] is None else map(int, match.groups())
    if min(pt, ph, pw) < 1:
        raise ValueError(f"model.variant {variant!r}: every patch size must be at least 1.")
    return VARIANTS[size], (pt, ph, pw)


def _check_minimums(section: str, config, **minimums: int) -> None:
    for name, low in minimums.items():
        if getattr(config, name) < low:
            raise ValueError(f"{section}.{name} must be at least {low}, got {getattr(config, name)}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The VideoDiT architecture. Width, depth, heads and patch all come from `variant`."""

    variant: str = "S/1x2x2"
    in_channels: int = 4  # latent channels C of the codec
    learn_sigma: bool = False  # also predict the variance (DiT): output has 2C channels
    num_classes: int = 0  # 0: no class labels; label `num_classes` is the null label (CFG)
    class_dropout_prob: float = 0.1  # labels replaced by the null label in training (CFG)
    text_dim: int = 0  # width of the text encoder's token features; 0: no text conditioning
    cross_attention: bool = True  # blocks attend to the text tokens (when text_dim > 0)
    mlp_ratio: float = 4.0
    frequency_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP
    dtype: str = "float32"  # computation dtype; parameters are always float32
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    remat: str = "none"  # one of REMAT_POLICIES, applied per block
    # Blocks held as one stack of parameters with a leading depth axis and applied by a scan:
    # XLA compiles one block instead of `depth`. Parameters are stored under another name
    # (`stacked_blocks`); `jaxdit.model.stack_blocks` converts an unrolled model's state.
    scan_layers: bool = False
    positions: str = "sincos"  # one of POSITIONS
    # Flow matching only: the network sees (1 - t) x_t, x_t scaled by its share of signal, so at high
    # noise the positions are not drowned by the patch embedding of the noise (at t = 1 the input is
    # zero and the prediction comes from the positions and the condition alone). Sampling does the same.
    flow_input_scale: bool = False
    qk_norm: bool = False  # RMSNorm of queries and keys in every attention
    # In training, each sample hides a fraction U(0, token_mask_ratio) of its video tokens behind a
    # learned mask embedding (MDT / MaskDiT): their prediction must come from the other tokens,
    # which teaches the model how the tokens of one clip depend on each other. 0: off.
    token_mask_ratio: float = 0.0
    # Self-attention over video tokens split along the sequence (train.context > 1): one of
    # CONTEXT_ATTENTION. It changes how attention communicates, never its result or the parameters.
    context_attention: str = "ulysses_ring"
    # ulysses_ring: devices per Ulysses group (must divide the heads and the context size);
    # 0: gcd(heads, context size), as much Ulysses as the heads allow, the rest a ring.
    ulysses_degree: int = 0

    def __post_init__(self):
        (width, _, heads), _ = parse_variant(self.variant)
        _check_choice("model.context_attention", self.context_attention, CONTEXT_ATTENTION)
        _check_minimums("model", self, ulysses_degree=0)
        if self.ulysses_degree and heads % self.ulysses_degree:
            raise ValueError(
                f"model.ulysses_degree={self.ulysses_degree} must divide the {heads} heads of {self.variant}; "
                "use a divisor, or 0 for gcd(heads, train.context)."
            )
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.positions", self.positions, POSITIONS)
        if not 0.0 <= self.token_mask_ratio < 1.0:
            raise ValueError(f"model.token_mask_ratio must be in [0, 1), got {self.token_mask_ratio}.")
        if "rope" in self.positions and ((width // heads) % 2 or width // heads < 6):
            raise ValueError(
                f"model.positions={self.positions!r} needs an even head width of at least 6; {self.variant} has "
                f"{width // heads}."
            )
        _check_choice("model.attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        _check_choice("model.remat", self.remat, REMAT_POLICIES)
        _check_minimums("model", self, in_channels=1, frequency_dim=1, num_classes=0, text_dim=0)
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be positive, got {self.mlp_ratio}.")
        # Sin-cos positions split the width in halves, each a sin and a cos half again.
        if width % 4 or width % heads:
            raise ValueError(f"model width {width} must be divisible by 4 and by the {heads} heads.")

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "ModelConfig":
        return cls(variant=variant, **overrides)

    @property
    def width(self) -> int:
        return parse_variant(self.variant)[0][0]

    @property
    def depth(self) -> int:
        return parse_variant(self.variant)[0][1]

    @property
    def heads(self) -> int:
        return parse_variant(self.variant)[0][2]

    @property
    def patch(self) -> tuple[int, int, int]:
        return parse_variant(self.variant)[1]

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def has_text(self) -> bool:
        return self.text_dim > 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where clips come from and how they are cut, captioned and batched."""

    source: str = "shapes"  # one of DATA_SOURCES
    manifest: str = ""  # source="folder": a CSV or JSONL with `path` and `text` columns
    cache: str = ""  # source="cache": a latent cache directory written by `python -m jaxdit.data.latent_cache`
    eval_manifest: str = ""  # source="folder", task="codec": held-out clips for PSNR ("": the first training clips)
    num_frames: int = 16
    size: int = 32  # frames are size x size pixels (folder videos: short side resized, centre-cropped)
    max_objects: int = 1  # source="shapes": up to this many shapes per clip
    frame_stride: int = 1  # source="folder": take every k-th frame ...
    fps: float = 0.0  # ... or resample to this frame rate (0: use frame_stride)
    caption_dropout: float = 0.1  # captions replaced by the empty caption, for classifier-free guidance
    seed: int = 0  # the shapes drawn and the shuffle order
    shuffle: bool = True
    num_workers: int = 0  # decoding processes; 0 decodes in the training process
    prefetch: int = 2  # batches read ahead

    def __post_init__(self):
        _check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "folder" and not self.manifest:
            raise ValueError("data.source='folder' needs data.manifest: a CSV or JSONL with path and text columns.")
        if self.source == "cache" and not self.cache:
            raise ValueError(
                "data.source='cache' needs data.cache: a directory written by `python -m jaxdit.data.latent_cache`."
            )
        _check_minimums("data", self, num_frames=1, size=1, max_objects=1, frame_stride=1, num_workers=0, prefetch=0)
        if self.fps < 0:
            raise ValueError(f"data.fps must be >= 0 (0: use data.frame_stride), got {self.fps}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}.")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text encoder: the byte tokenizer with a small encoder trained with the DiT (its width is
    model.text_dim), or a frozen pretrained T5 / umT5 read from a transformers folder (jaxdit.t5),
    whose width sets model.text_dim."""

    encoder: str = "byte"  # one of TEXT_ENCODERS
    path: str = ""  # encoder="t5": the folder with config.json, the safetensors weights and the tokenizer
    dtype: str = "auto"  # encoder="t5": its weights and computation; auto: bfloat16 on GPU / TPU, float32 on CPU
    max_length: int = 128  # tokens, BOS and EOS included: three moving-shapes objects fit
    depth: int = 2  # encoder="byte": the trained encoder's blocks
    heads: int = 4
    # encoder="byte": > 0 adds a hashed bag of byte bigrams (fastText-style, this many buckets) to the
    # caption's features, so the pooled caption carries every word at full strength; 0: off.
    bigram_buckets: int = 0

    def __post_init__(self):
        _check_choice("text.encoder", self.encoder, TEXT_ENCODERS)
        # No float16: T5 v1.1's activations overflow it (transformers clamps them; bfloat16 has the range).
        _check_choice("text.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _check_minimums("text", self, max_length=3, depth=1, heads=1, bigram_buckets=0)
        if self.bigram_buckets and self.encoder != "byte":
            raise ValueError("text.bigram_buckets is for the trained byte encoder (text.encoder='byte'); set it to 0.")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The forward (noising) process and the training objective."""

    process: str = "ddpm"  # one of PROCESSES
    num_steps: int = 1000  # ddpm: the discrete steps of the forward process
    schedule: str = "linear"  # ddpm: one of NOISE_SCHEDULES
    prediction: str = "epsilon"  # one of PREDICTIONS; a learn_sigma model (ddpm) adds DiT's variance term
    # flow: training times are `time_sampling` draws (logit_normal: sigmoid(N(time_mean, time_std^2))),
    # then shifted toward noise by t' = s t / (1 + (s - 1) t), in training and sampling alike. s is
    # `shift`, times sqrt(tokens / shift_reference_tokens) when that is > 0 (SD3's resolution rule).
    time_sampling: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    shift: float = 1.0
    shift_reference_tokens: int = 0

    def __post_init__(self):
        _check_choice("diffusion.process", self.process, PROCESSES)
        _check_minimums("diffusion", self, num_steps=1, shift_reference_tokens=0)
        _check_choice("diffusion.schedule", self.schedule, NOISE_SCHEDULES)
        _check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        _check_choice("diffusion.time_sampling", self.time_sampling, TIME_SAMPLINGS)
        if self.time_std <= 0 or self.shift <= 0:
            raise ValueError(
                f"diffusion.time_std and diffusion.shift must be positive; got {self.time_std} and {self.shift}."
            )
        if self.schedule == "linear" and 0.02 * 1000 / self.num_steps >= 1:  # DiT's betas, stretched
            raise ValueError(
                f"diffusion.num_steps={self.num_steps} is too few for the linear schedule (its last beta "
                "reaches 1); use at least 21 steps or diffusion.schedule='cosine'."
            )


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """The frozen codec between videos and the latents the model sees."""

    kind: str = "identity"  # one of CODECS
    path: str = ""  # kind="saved": a codec directory (jaxdit.codec.load), e.g. a codec-training run's workdir

    def __post_init__(self):
        _check_choice("codec.kind", self.kind, CODECS)
        if self.kind == "saved" and not self.path:
            raise ValueError(
                "codec.kind='saved' needs codec.path: the workdir of a codec training run "
                "(train.py --config configs/codec_shapes.py) or a directory from `python -m jaxdit.convert.sd_vae`."
            )


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The video autoencoder that `task="codec"` trains: convolutional, KL-regularised, causal in time.

    Pixels are first grouped `patch` x `patch` into channels; each level after the first halves
    the pixels again, and the first `temporal_downsample` of those
    also halve time, causally: frame 0 is kept on its own, so clips have 1 + 2^k * n frames
    and a single image is a valid 1-frame video.
    """

    channels: tuple[int, ...] = (32, 64, 128)  # width of each level; len - 1 spatial halvings
    temporal_downsample: int = 0  # how many of the halvings also halve time
    latent_channels: int = 4
    blocks: int = 1  # residual blocks per level
    patch: int = 1  # pixels p x p stacked as channels before the first level: p times more spatial compression
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) against the reconstruction loss
    reconstruction: str = "l1"  # one of RECONSTRUCTION_LOSSES, on pixels in [-1, 1]
    eval_clips: int = 64  # held-out clips for the PSNR reported at every preview and at the end

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # a list after a JSON round trip
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"autoencoder.channels must be a non-empty list of positive widths; got {self.channels}.")
        if not 0 <= self.temporal_downsample <= len(self.channels) - 1:
            raise ValueError(
                f"autoencoder.temporal_downsample={self.temporal_downsample} must be in 0..{len(self.channels) - 1} "
                "(the number of halvings, len(channels) - 1)."
            )
        _check_minimums("autoencoder", self, latent_channels=1, blocks=1, patch=1, eval_clips=1)
        _check_choice("autoencoder.reconstruction", self.reconstruction, RECONSTRUCTION_LOSSES)
        if self.kl_weight < 0:
            raise ValueError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, parallelism, checkpoints and logging of a training run."""

    steps: int = 10_000
    batch_size: int = 32  # global: split over every device of every process
    seed: int = 0  # parameters and the noise and steps drawn in training
    learning_rate: float = 1e-4  # DiT: AdamW at 1e-4, no weight decay
    lr_schedule: str = "constant"  # one of LR_SCHEDULES, after the warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0  # decoupled (AdamW), on weight matrices only: not on biases or norm scales
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    grad_clip: float = 1.0  # global gradient norm; 0 turns clipping off
    ema_decay: float = 0.9999  # exponential moving average of the parameters, used for sampling
    max_bad_steps: int = 10  # stop after this many consecutive steps with a non-finite loss
    fsdp: int = 1  # devices per parameter shard (the mesh's fsdp axis); the rest is data parallel
    # devices over which each clip's video tokens are split along the sequence (the mesh's context
    # axis; jaxdit.context_parallel): activation memory per device falls about 1/context
    context: int = 1
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    log_every: int = 50  # steps between metrics.jsonl / TensorBoard records

    def __post_init__(self):
        _check_minimums(
            "train", self, steps=1, batch_size=1, warmup_steps=0, max_bad_steps=1, fsdp=1, context=1,
            checkpoint_every=1, keep_checkpoints=1, log_every=1,
        )
        _check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must be smaller than train.steps={self.steps}; "
                "lower it, e.g. --train.warmup_steps 0."
            )
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.learning_rate must be positive; train.weight_decay and train.grad_clip >= 0.")
        for name in ("adam_b1", "adam_b2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How a run's videos are generated: sample.py's and Pipeline's defaults, train.py's previews."""

    sampler: str = ""  # one of SAMPLERS[diffusion.process]; "": its first (ddim, or euler for flow)
    steps: int = 50  # ddpm: visited steps, evenly spaced over the training steps; flow: ODE steps
    eta: float = 0.0  # DDIM's noise scale: 0 deterministic, 1 as much noise as DDPM
    cfg_scale: float = 4.0  # classifier-free guidance g; 1 turns guidance off (one pass per step)
    # Latent channels that guidance moves; 0: all. DiT's sample.py guides the first 3 of its 4 (for
    # exact reproducibility of its paper's numbers), which configs/dit_xl2_*.py copy.
    guidance_channels: int = 0
    fps: float = 8.0  # frames per second of written .mp4 / .gif files
    prompts: tuple[str, ...] = ()  # train.py writes videos of these; on the command line: "a ...;a ..."
    num_samples: int = 1  # samples of each prompt in train.py's videos
    every: int = 0  # steps between train.py's videos; 0: only at the end of training
    # Built-in shapes only: at each of those steps also generate this many fixed one-object prompts
    # (jaxdit.data.judge.one_object_prompts), judge them and log the pass rates (adherence/colour, ...).
    judge_prompts: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))  # a list after a JSON round trip
        if self.sampler:
            _check_choice("sample.sampler", self.sampler, sum(SAMPLERS.values(), ()))
        _check_minimums("sample", self, steps=1, num_samples=1, every=0, guidance_channels=0, judge_prompts=0)
        if self.eta < 0 or self.cfg_scale < 0 or self.fps <= 0:
            raise ValueError("sample.eta and sample.cfg_scale must be >= 0 and sample.fps positive.")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs."""

    name: str = "default"
    task: str = "dit"  # one of TASKS
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)

    def __post_init__(self):
        _check_choice("task", self.task, TASKS)
        resolve_sampler(self.sample.sampler, self.diffusion.process)
        if self.sample.judge_prompts and self.data.source != "shapes":
            raise ValueError(
                "sample.judge_prompts judges prompts of the built-in moving shapes (data.source='shapes'); "
                "set --sample.judge_prompts 0 for other data."
            )
        if self.model.flow_input_scale and self.diffusion.process != "flow":
            raise ValueError(
                "model.flow_input_scale scales x_t by flow matching's signal share 1 - t; it needs "
                f"diffusion.process='flow', not {self.diffusion.process!r}."
            )
        if self.diffusion.process == "flow" and self.model.learn_sigma:
            raise ValueError("model.learn_sigma is DDPM's learned variance: a flow run (diffusion.process='flow') has none.")
        context_degrees(self.model.context_attention, self.model.heads, self.train.context, self.model.ulysses_degree)
        if self.sample.guidance_channels > self.model.in_channels:
            raise ValueError(
                f"sample.guidance_channels={self.sample.guidance_channels} exceeds the model's "
                f"{self.model.in_channels} latent channels (model.in_channels); use 0 (all) or fewer."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The inverse of `to_dict`, e.g. for a run's saved config. Unknown keys are errors."""
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {', '.join(sections)}.")
        kwargs = {}
        for name, value in values.items():
            section_type = sections[name].type
            kwargs[name] = _section(section_type, name, value) if dataclasses.is_dataclass(section_type) else value
        return cls(**kwargs)


def _section(section_type, name: str, values: dict):
    fields = {f.name for f in dataclasses.fields(section_type)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)} in config section {name!r}; known: {', '.join(sorted(fields))}.")
    return section_type(**values)


def _parse_value(flag: str, text: str, current):
    """A command-line string as the type of the field's current value."""
    if isinstance(current, tuple) and current and all(isinstance(v, int) for v in current):  # widths: "32,64"
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated integers, e.g. 32,64,128; got {text!r}.") from None
    if isinstance(current, tuple):  # prompts: separated by ";"
        return tuple(part.strip() for part in text.split(";") if part.strip())
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{flag} takes true or false, got {text!r}.")
        return text.lower() in ("true", "1")
    try:
        return type(current)(text)
    except ValueError:
        raise ValueError(f"{flag} takes a {type(current).__name__}, got {text!r}.") from None


def apply_overrides(config: Config, args: list[str]) -> Config:
    """`["--train.steps", "200", "--model.variant=B/2"]` -> the config with those fields replaced.

    Every field of every section can be set as `--section.field VALUE` (or `--section.field=VALUE`);
    the value is parsed as the field's type (booleans: true/false). `--name NAME` renames the run and `--task codec` trains its autoencoder.
    """
    values = config.to_dict()
    args = list(args)
    while args:
        flag = args.pop(0)
        if "=" in flag:
            flag, text = flag.split("=", 1)
        elif args:
            text = args.pop(0)
        else:
            raise ValueError(f"{flag} needs a value, e.g. {flag} VALUE.")
        key = flag.removeprefix("--")
        if not flag.startswith("--") or not key:
            raise ValueError(f"expected --section.field VALUE, got {flag!r}.")
        section, _, field = key.partition(".")
        if section in ("name", "task") and not field:
            values[section] = text
            continue
        if section not in values or not isinstance(values[section], dict):
            raise ValueError(f"unknown config section in {flag!r}; sections: {', '.join(k for k in values if k != 'name')}.")
        if field not in values[section]:
            raise ValueError(
                f"unknown config field {flag!r}; fields of {section}: {', '.join(sorted(values[section]))}."
            )
        values[section][field] = _parse_value(flag, text, values[section][field])
    return Config.from_dict(values)


def load_config(path: str | pathlib.Path) -> Config:
    """Imports a `configs/*.py` file and returns its `get_config()`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; see configs/ for the shipped ones.")
    spec = importlib.util.spec_from_file_location(f"jaxdit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {str(path)!r} defines no get_config() function.")
    config = module.get_config()
    if not isinstance(config, Config):
        raise TypeError(f"get_config() in {str(path)!r} returned {type(config).__name__}, not jaxdit.Config.")
    return config
