"""The model's config: the table of model sizes and `ModelConfig`.

A model size is named by a variant string, "<size>/<patch>", as in DiT's `DiT_models`:
`"XL/1x2x2"` is DiT-XL (width 1152, depth 28, 16 heads) over spacetime patches of 1 frame
by 2x2 pixels. `"XL/2"` is short for `"XL/1x2x2"`, DiT's image patch. Every other field of
`ModelConfig` is an architecture option of the one `VideoDiT` (jaxdit.model).
"""

import dataclasses
import re

from jaxdit.options import (
    ATTENTION_IMPLEMENTATIONS,
    CONTEXT_ATTENTION,
    DTYPES,
    POSITIONS,
    REMAT_POLICIES,
    check_choice,
    check_minimums,
)

# size name -> (width, depth, heads). S/B/L/XL are DiT's; "tiny" is for tests and CPU demos.
VARIANTS = {
    "tiny": (64, 2, 4),
    "mini": (128, 4, 4),  # the default CPU demo (configs/shapes_tiny.py)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

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
    # Frame conditioning (jaxdit.frames): the model also takes a mask of given latent frames and their
    # latents, as extra input channels through a zero-initialised patch embedding, so it can be prompted
    # with images and clips. Trained with train.condition.
    frame_condition: bool = False
    # Self-attention over video tokens split along the sequence (train.context > 1): one of
    # CONTEXT_ATTENTION. It changes how attention communicates, never its result or the parameters.
    context_attention: str = "ulysses_ring"
    # ulysses_ring: devices per Ulysses group (must divide the heads and the context size);
    # 0: gcd(heads, context size), as much Ulysses as the heads allow, the rest a ring.
    ulysses_degree: int = 0

    def __post_init__(self):
        (width, _, heads), _ = parse_variant(self.variant)
        check_choice("model.context_attention", self.context_attention, CONTEXT_ATTENTION)
        check_minimums("model", self, ulysses_degree=0)
        if self.ulysses_degree and heads % self.ulysses_degree:
            raise ValueError(
                f"model.ulysses_degree={self.ulysses_degree} must divide the {heads} heads of {self.variant}; "
                "use a divisor, or 0 for gcd(heads, train.context)."
            )
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.positions", self.positions, POSITIONS)
        if not 0.0 <= self.token_mask_ratio < 1.0:
            raise ValueError(f"model.token_mask_ratio must be in [0, 1), got {self.token_mask_ratio}.")
        if "rope" in self.positions and ((width // heads) % 2 or width // heads < 6):
            raise ValueError(
                f"model.positions={self.positions!r} needs an even head width of at least 6; {self.variant} has "
                f"{width // heads}."
            )
        check_choice("model.attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        check_minimums("model", self, in_channels=1, frequency_dim=1, num_classes=0, text_dim=0)
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

