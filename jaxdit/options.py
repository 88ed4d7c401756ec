"""The named choices of jaxdit's config fields, and the rules that resolve two of them.

Each tuple lists what one config field accepts (`model.dtype` one of DTYPES, ...); a config section
checks its values against them with `check_choice` and `check_minimums`, which name the field and
what it accepts. `resolve_sampler` and `context_degrees` turn two fields into what runs.
"""

import math

DTYPES = ("float32", "bfloat16", "float16")
# the built-in moving shapes, videos listed in a manifest, or latents encoded once (jaxdit.data.latent_cache)
DATA_SOURCES = ("shapes", "folder", "cache")
# "auto": cuDNN flash attention on GPU with 16-bit compute; "splash", jax's Pallas splash-attention
# kernel, on a TPU (any lengths, padded to its tiles; on several devices, per device under the trace's
# mesh); XLA everywhere else. The rules are jaxdit.attention.resolve_implementation's.
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
# The block's layout options (jaxdit.model_config.ModelConfig): DiT's first, then Wan 2.1's.
QK_NORM_SCOPES = ("head", "all_heads")  # RMSNorm of q and k over each head's Dh, or over all heads' D
ROPE_PAIRS = ("halves", "interleaved")  # rotated pairs (j, j + Dh/2), or (2j, 2j + 1)
MODULATIONS = ("per_block", "shared")  # adaLN's Linear in every block, or one for all plus a table per block
CROSS_NORMS = ("adaln", "layernorm")  # cross-attention behind adaLN with a gate, or a LayerNorm and no gate
FINAL_LAYERS = ("adaln", "table")  # the final shift and scale from Linear(SiLU(c)), or a table plus c
TEXT_PADDINGS = ("masked", "attended")  # cross-attention skips the caption's padding, or attends its zeros
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
# for DDPM runs; Euler or Heun (2nd order) ODE integration, or UniPC (multistep, 2nd order, one
# evaluation a step, on diffusers' flow sigma grid: Wan's sampler; jaxdit.unipc) for flow runs.
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "flow": ("euler", "heun", "unipc")}


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



def check_minimums(section: str, config, **minimums: int) -> None:
    """Each named field of `config` is at least its minimum, or an error names the field."""
    for name, low in minimums.items():
        if getattr(config, name) < low:
            raise ValueError(f"{section}.{name} must be at least {low}, got {getattr(config, name)}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """`value` is one of `choices`, or an error names the field `name` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


CONDITIONS = ("text", "first", "last", "first_last", "lead", "trail")  # what a clip is trained with


def parse_condition(text: str) -> dict[str, float]:
    """'first=0.3,last=0.1' -> the probability of every kind of CONDITIONS, "text" taking the rest."""
    probabilities = dict.fromkeys(CONDITIONS, 0.0)
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in CONDITIONS[1:] or not value:
            raise ValueError(
                f"train.condition lists kind=probability pairs of {', '.join(CONDITIONS[1:])} (text only takes "
                f"the rest), e.g. 'first=0.3,last=0.1'; got {part!r}."
            )
        try:
            probabilities[name] = float(value)
        except ValueError:
            raise ValueError(f"train.condition: {name}'s probability must be a number; got {value!r}.") from None
    if any(p < 0 for p in probabilities.values()) or sum(probabilities.values()) > 1 + 1e-9:
        raise ValueError(f"train.condition: probabilities must be >= 0 and add up to at most 1; got {text!r}.")
    probabilities["text"] = max(0.0, 1.0 - sum(probabilities.values()))
    return probabilities


# What train.lora_targets may name: a sublayer of every block (all of its projections), or one projection.
LORA_TARGETS = {"attn": ("qkv", "proj"), "cross": ("q", "kv", "proj"), "mlp": ("fc1", "fc2")}
LORA_PARTS = {"attn.qkv": 3, "cross.kv": 2}  # fused projections: (q, k, v) and (k, v)


def parse_lora_targets(targets: str) -> tuple[str, ...]:
    """"attn,mlp.fc1" -> ("attn.qkv", "attn.proj", "mlp.fc1"): every projection named, in LORA_TARGETS's order."""
    projections = [f"{sublayer}.{name}" for sublayer, names in LORA_TARGETS.items() for name in names]
    asked = [name.strip() for name in targets.split(",") if name.strip()]
    unknown = [name for name in asked if name not in LORA_TARGETS and name not in projections]
    if unknown or not asked:
        raise ValueError(
            f"train.lora_targets={targets!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'names nothing'}; "
            f"name sublayers of the blocks ({', '.join(LORA_TARGETS)}) or projections ({', '.join(projections)}), "
            "comma-separated, e.g. 'attn,cross'."
        )
    return tuple(p for p in projections if p in asked or p.split(".")[0] in asked)
