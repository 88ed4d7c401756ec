"""Configs: a run's frozen dataclasses, one a section, and how they are read and overridden.

`Config` holds the sections (model, data, text, diffusion, codec, train, sample, autoencoder).
The model's section and the table of model sizes are in `jaxdit.model_config`, the named choices of
every field in `jaxdit.options`; both are re-exported here, so `from jaxdit.config import ...` reaches
all of them. Config files (`configs/*.py`) define `get_config()` returning a `Config`; `load_config`
reads one, and `apply_overrides` applies `--section.field VALUE` flags.
"""

import dataclasses
import importlib.util
import pathlib
import re
import typing

from jaxdit.model_config import VARIANTS, ModelConfig, parse_variant
from jaxdit.options import (
    ATTENTION_IMPLEMENTATIONS,
    CODECS,
    CONTEXT_ATTENTION,
    CONTEXT_AXIS,
    DATA_SOURCES,
    DTYPES,
    LR_SCHEDULES,
    NOISE_SCHEDULES,
    POSITIONS,
    PREDICTIONS,
    PROCESSES,
    RECONSTRUCTION_LOSSES,
    REMAT_POLICIES,
    SAMPLERS,
    TASKS,
    TEXT_ENCODERS,
    TIME_SAMPLINGS,
    check_choice,
    check_minimums,
    context_degrees,
    parse_condition,
    parse_lora_targets,
    resolve_sampler,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "CODECS", "CONTEXT_ATTENTION", "CONTEXT_AXIS", "DATA_SOURCES", "DTYPES",
    "LR_SCHEDULES", "NOISE_SCHEDULES", "POSITIONS", "PREDICTIONS", "PROCESSES", "RECONSTRUCTION_LOSSES",
    "REMAT_POLICIES", "SAMPLERS", "TASKS", "TEXT_ENCODERS", "TIME_SAMPLINGS", "VARIANTS",
    "AutoencoderConfig", "CodecConfig", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "ModelConfig",
    "SampleConfig", "TextConfig", "TrainConfig",
    "apply_overrides", "context_degrees", "load_config", "parse_variant", "resolve_sampler",
]


class ConfigError(ValueError):
    """A config that cannot run here (e.g. a batch that does not split over the devices)."""


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
    # Clips of several shapes in one run (jaxdit.data.buckets): (frames, height, width) buckets, on the
    # command line "8x32x64;8x64x32;1x32x32"; one shape per global step. Empty: the one shape
    # (num_frames, size, size). Images are one-frame buckets.
    buckets: tuple[tuple[int, int, int], ...] = ()
    # Each bucket's global batch: bucket_batches (one per bucket), or the token budget bucket_tokens
    # (batch = budget / the bucket's video tokens, rounded down to a multiple of the data-parallel
    # devices), or train.batch_size for every bucket.
    bucket_batches: tuple[int, ...] = ()
    bucket_tokens: int = 0
    bucket_keep: tuple[float, ...] = ()  # per bucket: the probability that a clip of it is used in an epoch

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(_bucket_shape(b) for b in self.buckets))
        object.__setattr__(self, "bucket_batches", tuple(int(b) for b in self.bucket_batches))
        object.__setattr__(self, "bucket_keep", tuple(float(k) for k in self.bucket_keep))
        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "folder" and not self.manifest:
            raise ValueError("data.source='folder' needs data.manifest: a CSV or JSONL with path and text columns.")
        if self.source == "cache" and not self.cache:
            raise ValueError(
                "data.source='cache' needs data.cache: a directory written by `python -m jaxdit.data.latent_cache`."
            )
        check_minimums("data", self, num_frames=1, size=1, max_objects=1, frame_stride=1, num_workers=0, prefetch=0)
        self._check_buckets()
        if self.fps < 0:
            raise ValueError(f"data.fps must be >= 0 (0: use data.frame_stride), got {self.fps}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}.")

    def _check_buckets(self) -> None:
        count = len(self.shapes)
        if len(set(self.shapes)) != count:
            raise ValueError(f"data.buckets lists a shape twice: {self.buckets}.")
        if any(min(shape) < 1 for shape in self.shapes):
            raise ValueError(f"data.buckets: every frames, height and width must be at least 1; got {self.buckets}.")
        for name, values in (("bucket_batches", self.bucket_batches), ("bucket_keep", self.bucket_keep)):
            if values and len(values) != count:
                raise ValueError(f"data.{name} needs one value per bucket ({count}); got {len(values)}: {values}.")
        if self.bucket_batches and self.bucket_tokens:
            raise ValueError("set data.bucket_batches or data.bucket_tokens, not both.")
        if any(b < 1 for b in self.bucket_batches) or self.bucket_tokens < 0:
            raise ValueError("data.bucket_batches must be positive and data.bucket_tokens >= 0.")
        if any(not 0 < k <= 1 for k in self.bucket_keep):
            raise ValueError(f"data.bucket_keep: every keep probability must be in (0, 1]; got {self.bucket_keep}.")

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The (frames, height, width) of the videos this data trains on: the buckets, or the one shape."""
        return self.buckets or ((self.num_frames, self.size, self.size),)


def _bucket_shape(bucket) -> tuple[int, int, int]:
    """'8x32x64' or (8, 32, 64) (a list after a JSON round trip) -> (8, 32, 64)."""
    parts = bucket.lower().split("x") if isinstance(bucket, str) else list(bucket)
    try:
        shape = tuple(int(part) for part in parts)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"a data.buckets entry is frames x height x width, e.g. 8x32x64; got {bucket!r}.")
    return shape


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
        check_choice("text.encoder", self.encoder, TEXT_ENCODERS)
        # No float16: T5 v1.1's activations overflow it (transformers clamps them; bfloat16 has the range).
        check_choice("text.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        check_minimums("text", self, max_length=3, depth=1, heads=1, bigram_buckets=0)
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
        check_choice("diffusion.process", self.process, PROCESSES)
        check_minimums("diffusion", self, num_steps=1, shift_reference_tokens=0)
        check_choice("diffusion.schedule", self.schedule, NOISE_SCHEDULES)
        check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        check_choice("diffusion.time_sampling", self.time_sampling, TIME_SAMPLINGS)
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
        check_choice("codec.kind", self.kind, CODECS)
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
        check_minimums("autoencoder", self, latent_channels=1, blocks=1, patch=1, eval_clips=1)
        check_choice("autoencoder.reconstruction", self.reconstruction, RECONSTRUCTION_LOSSES)
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
    keep_checkpoints: int = 3  # the newest ones; the newest that read back completely is always kept too
    # A resume that finds the newest checkpoint damaged falls back to the newest that reads and leaves
    # the damaged one in place; True moves it aside to checkpoints/STEP.damaged.
    quarantine_damaged: bool = False
    log_every: int = 50  # steps between metrics.jsonl / TensorBoard records
    # Compile the train step for every bucket, report compile time and memory, and stop there.
    compile_only: bool = False
    # Frame conditioning (model.frame_condition; jaxdit.frames): the share of clips trained with given
    # frames, by kind, e.g. "first=0.3,last=0.1,first_last=0.05,lead=0.05,trail=0.05"; the rest are
    # text only. A leading or trailing clip ("lead", "trail") is condition_frames latent frames.
    condition: str = ""
    condition_frames: int = 1
    # A run folder (an import of jaxdit.convert, or a jaxdit DiT run) whose EMA weights start this run as
    # its parameters and EMA, with a fresh optimizer at step 0; its model, diffusion, codec and text settings
    # become this run's (jaxdit.init_from). Read when the run starts, not after its first checkpoint.
    init_from: str = ""
    # LoRA (jaxdit.lora): a rank r > 0 trains low-rank adapters on the blocks' linear layers that lora_targets
    # names (sublayers "attn", "cross", "mlp", or projections such as "attn.qkv" or "mlp.fc2", comma-separated),
    # each scaled by lora_alpha / r (0: the rank, a factor of 1), in place of every weight. The optimizer and
    # the checkpoints hold only the adapters; the base weights are init_from's, read at every start.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = "attn,cross"
    lora_base_dtype: str = "float32"  # one of DTYPES: the frozen base weights on the devices ("bfloat16" halves them)

    def __post_init__(self):
        check_minimums(
            "train", self, steps=1, batch_size=1, warmup_steps=0, max_bad_steps=1, fsdp=1, context=1,
            checkpoint_every=1, keep_checkpoints=1, log_every=1,
        )
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_minimums("train", self, condition_frames=1, lora_rank=0)
        check_choice("train.lora_base_dtype", self.lora_base_dtype, DTYPES)
        if self.lora_rank:
            parse_lora_targets(self.lora_targets)
        if self.lora_alpha < 0:
            raise ValueError(f"train.lora_alpha must be >= 0 (0: the rank), got {self.lora_alpha}.")
        parse_condition(self.condition)
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
    # Guidance's unconditional branch reads this caption instead of the empty one (a text model's
    # "negative prompt": what the samples should not look like, e.g. Wan's list of artefacts).
    negative_prompt: str = ""
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
            check_choice("sample.sampler", self.sampler, sum(SAMPLERS.values(), ()))
        check_minimums("sample", self, steps=1, num_samples=1, every=0, guidance_channels=0, judge_prompts=0)
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
        check_choice("task", self.task, TASKS)
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
        conditioned = parse_condition(self.train.condition)["text"] < 1
        if conditioned != self.model.frame_condition and self.task == "dit":
            raise ValueError(
                "train.condition (the share of clips trained with given frames) needs model.frame_condition=True, "
                "the model's input for them; set both, or neither."
                if conditioned else
                "model.frame_condition=True needs train.condition, the share of clips trained with given frames, "
                "e.g. --train.condition first=0.3,last=0.1; or set model.frame_condition=False."
            )
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


def _parse_value(flag: str, text: str, current, annotation):
    """A command-line string as the field's declared type (`annotation`; that of its current value for the rest)."""
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if item in (int, float):  # widths "32,64,128", batches "16,8", keep probabilities "1,0.5"
            try:
                return tuple(item(part) for part in text.split(",") if part.strip())
            except ValueError:
                raise ValueError(f"{flag} takes comma-separated {item.__name__}s, e.g. 32,64; got {text!r}.") from None
        # prompts "a ...; a ..." (they may hold commas); buckets "8x32x64;1x32x32" or "8x32x64,1x32x32"
        separators = ";" if item is str else "[;,]"
        return tuple(part.strip() for part in re.split(separators, text) if part.strip())
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
        annotation = {f.name: f.type for f in dataclasses.fields(Config.__dataclass_fields__[section].type)}[field]
        values[section][field] = _parse_value(flag, text, values[section][field], annotation)
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
