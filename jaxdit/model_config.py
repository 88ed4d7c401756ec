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
    CROSS_NORMS,
    DTYPES,
    FINAL_LAYERS,
    MODULATIONS,
    POSITIONS,
    QK_NORM_SCOPES,
    REMAT_POLICIES,
    ROPE_PAIRS,
    TEXT_PADDINGS,
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
    # Wan 2.1's transformers (with WAN_LAYOUT; jaxdit.convert.wan imports their weights).
    "wan1.3B": (1536, 30, 12),
    "wan14B": (5120, 40, 40),
}

_PATCH = re.compile(r"^(\d+)(?:x(\d+)x(\d+))?$")
_SIZE = re.compile(r"^(\d+)x(\d+)x(\d+)$")  # an explicit size: width x depth x heads


def parse_variant(variant: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """`"B/2x4x4"` -> ((width, depth, heads), (pt, ph, pw)); `"B/2"` means patch (1, 2, 2). A size may
    also be written out as width x depth x heads: `"24x2x2/1x2x2"`."""
    size, _, patch = variant.partition("/")
    match, explicit = _PATCH.match(patch), _SIZE.match(size)
    if (size not in VARIANTS and explicit is None) or match is None:
        raise ValueError(
            f"model.variant {variant!r} is not a known variant: write <size>/<patch> with size one "
            f"of {', '.join(VARIANTS)} (or WIDTHxDEPTHxHEADS) and patch 'P' (image, 1xPxP) or 'PTxPHxPW', "
            "e.g. 'XL/1x2x2'."
        )
    pt, ph, pw = (1, int(match[1]), int(match[1])) if match[2] is None else map(int, match.groups())
    if min(pt, ph, pw) < 1:
        raise ValueError(f"model.variant {variant!r}: every patch size must be at least 1.")
    dims = VARIANTS[size] if size in VARIANTS else tuple(map(int, explicit.groups()))
    if min(dims) < 1:
        raise ValueError(f"model.variant {variant!r}: width, depth and heads must be at least 1.")
    return dims, (pt, ph, pw)



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
    # The block's layout. DiT's is the default; Wan 2.1's is WAN_LAYOUT (below), each a choice of its own.
    qk_norm_scope: str = "head"  # one of QK_NORM_SCOPES: over each head's Dh, or over all heads' D (Wan)
    rope_pairs: str = "halves"  # one of ROPE_PAIRS: which channels of a head rotate together
    modulation: str = "per_block"  # one of MODULATIONS: "shared" is one Linear(D, 6D) for all blocks (Wan)
    cross_norm: str = "adaln"  # one of CROSS_NORMS: "layernorm" puts cross-attention behind a LayerNorm (Wan)
    final_layer: str = "adaln"  # one of FINAL_LAYERS: "table" adds a learned table to the raw c (Wan)
    # The text tokens through Linear(E, D) -> GELU -> Linear(D, D) once, before every block's
    # cross-attention (Wan); False: each block's keys and values read the E-wide features directly.
    text_projection: bool = False
    pooled_text: bool = True  # the mean of the text tokens, through an MLP, is part of c (False: Wan)
    mlp_width: int = 0  # the MLP's hidden width; 0: width * mlp_ratio
    # Cross-attention over the caption's tokens only ("masked"), or over every token up to text.max_length,
    # the padding's features zero ("attended": Wan, whose umT5 features are zero-padded to 512 and all attended).
    text_padding: str = "masked"
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
        check_minimums("model", self, mlp_width=0)
        for name, choices in (
            ("qk_norm_scope", QK_NORM_SCOPES), ("rope_pairs", ROPE_PAIRS), ("modulation", MODULATIONS),
            ("cross_norm", CROSS_NORMS), ("final_layer", FINAL_LAYERS), ("text_padding", TEXT_PADDINGS),
        ):
            check_choice(f"model.{name}", getattr(self, name), choices)
        if self.text_dim and not (self.pooled_text or self.cross_attention):
            raise ValueError(
                "model.pooled_text=False and model.cross_attention=False leave the text unused: turn one on."
            )
        # Sin-cos positions split the width in halves, each a sin and a cos half again.
        if width % 4 or width % heads:
            raise ValueError(f"model width {width} must be divisible by 4 and by the {heads} heads.")

    @property
    def hidden_width(self) -> int:
        """The MLP's hidden width."""
        return self.mlp_width or int(self.width * self.mlp_ratio)

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


# Wan 2.1's block layout (its diffusers `WanTransformer3DModel`), as options of the one VideoDiT. With a
# "wan1.3B/1x2x2" or "wan14B/1x2x2" variant, 16 latent channels and 4096-wide umT5 features it is Wan 2.1
# T2V: ModelConfig(variant="wan1.3B/1x2x2", in_channels=16, text_dim=4096, mlp_width=8960, **WAN_LAYOUT).
WAN_LAYOUT = dict(
    positions="rope", qk_norm=True, qk_norm_scope="all_heads", rope_pairs="interleaved", modulation="shared",
    cross_norm="layernorm", final_layer="table", text_projection=True, pooled_text=False, text_padding="attended",
)
WAN_MLP_WIDTHS = {"wan1.3B": 8960, "wan14B": 13824}
