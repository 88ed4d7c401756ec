"""Configs: frozen dataclasses and the table of model sizes.

A model size is named by a variant string, "<size>/<patch>", as in DiT's `DiT_models`:
`"XL/1x2x2"` is DiT-XL (width 1152, depth 28, 16 heads) over spacetime patches of 1 frame
by 2x2 pixels. `"XL/2"` is short for `"XL/1x2x2"`, DiT's image patch.

Config files (`configs/*.py`) define `get_config()` returning a `Config`; `load_config` reads one.
"""

import dataclasses
import importlib.util
import pathlib
import re

# size name -> (width, depth, heads). S/B/L/XL are DiT's; "tiny" is for tests and CPU demos.
VARIANTS = {
    "tiny": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("shapes", "folder")  # the built-in moving shapes, or videos listed in a manifest
# "auto": cuDNN flash attention on GPU with 16-bit compute, XLA everywhere else.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# What a block keeps for the backward pass: everything, nothing (recompute the block),
# or only the matmul outputs.
REMAT_POLICIES = ("none", "full", "dots")

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

    def __post_init__(self):
        (width, _, heads), _ = parse_variant(self.variant)
        _check_choice("model.dtype", self.dtype, DTYPES)
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
        _check_minimums("data", self, num_frames=1, size=1, max_objects=1, frame_stride=1, num_workers=0, prefetch=0)
        if self.fps < 0:
            raise ValueError(f"data.fps must be >= 0 (0: use data.frame_stride), got {self.fps}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}.")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The byte tokenizer and the trainable text encoder (its width is model.text_dim)."""

    max_length: int = 128  # tokens, BOS and EOS included: three moving-shapes objects fit
    depth: int = 2
    heads: int = 4

    def __post_init__(self):
        _check_minimums("text", self, max_length=3, depth=1, heads=1)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Later sections (train, sample) join as they are built."""

    name: str = "default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)


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
