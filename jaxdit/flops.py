"""Model FLOPs of the VideoDiT, and device peaks: the numerator and denominator of MFU.

Counted as DESIGN.md's "Measuring speed honestly" says: the FLOPs of the matrix
multiplications of one sample's forward pass, a multiply-add being 2 FLOPs; a training step
is 3 forward passes' worth (the backward pass costs about twice the forward). The frozen codec
and the text encoder are not counted, nor are elementwise work (norms, softmax, GELU,
modulation, residuals) or the extra forward a rematerialised block recomputes: MFU counts the
model's FLOPs, not the hardware's. Per block, with N video tokens of width D, hidden width
M = int(D * mlp_ratio), L text tokens of width E:

    self-attention   qkv 2*N*D*3D + proj 2*N*D*D + scores and values 4*N^2*D
    MLP              2 * 2*N*D*M                       (= 2*N*8*D^2 at mlp_ratio 4)
    cross-attention  q and proj 2 * 2*N*D*D + kv 2*L*E*2D + scores and values 4*N*L*D
    adaLN-Zero       2*D*(6 or 9)*D, once per sample, not per token

plus the patch embedding, the timestep and pooled-text MLPs and the final layer. At
mlp_ratio 4 the first two lines are DESIGN.md's 2*N*(12*D^2) + 4*N^2*D.

DiT reports "Gflops" counting a multiply-add as ONE flop (facebookresearch/DiT#14): its
118.6 Gflops for DiT-XL/2 at 256x256 are 118.6e9 multiply-adds, 237.2e9 FLOPs here.

Pure Python: no jax import, so benchmarks and scripts can count before building anything.
"""

import math

from jaxdit.model_config import ModelConfig

FLOPS_PER_MULTIPLY_ADD = 2
TRAIN_FORWARD_EQUIVALENTS = 3  # forward + backward (gradients of activations and of weights)

# Dense bfloat16 peak of one device (chip) in TFLOP/s, from the vendors' data sheets, matched on
# a substring of `jax.devices()[0].device_kind` in this order (the first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),  # the PCIe card runs slower clocks than the SXM one
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" (SXM)
    ("H200", 989.0),  # "NVIDIA H200": an H100 with more and faster memory
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p: "TPU v5p" or "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """A device's dense bf16 peak in TFLOP/s, or None where it is not known (e.g. a CPU)."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in kind:
            return peak
    return None


def model_flops_utilization(flops_per_sample: float, samples_per_s: float, devices: int, device_kind: str) -> float | None:
    """MFU = flops_per_sample * samples_per_s / (devices * peak); None where the peak is unknown."""
    peak = peak_tflops(device_kind)
    if peak is None:
        return None
    return flops_per_sample * samples_per_s / (devices * peak * 1e12)


def num_tokens(model: ModelConfig, latent_shape: tuple[int, ...]) -> int:
    """Video tokens N of one sample of latents (T, H, W, C)."""
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape is one sample's (T, H, W, C), got {tuple(latent_shape)}.")
    sizes, patch = list(latent_shape[:3]), model.patch
    if sizes[0] == 1:  # an image fills a temporal patch (jaxdit.frames.pad_frames)
        sizes[0] = patch[0]
    if any(size % p for size, p in zip(sizes, patch, strict=True)):
        raise ValueError(f"latents {tuple(latent_shape)} do not divide into patches {'x'.join(map(str, patch))}.")
    return math.prod(size // p for size, p in zip(sizes, patch, strict=True))


def forward_flops_by_part(model: ModelConfig, latent_shape: tuple[int, ...], text_length: int = 0) -> dict[str, int]:
    """One sample's forward FLOPs of each part of the VideoDiT (all blocks summed).

    latent_shape: (T, H, W, C); text_length: text tokens L the blocks attend to (the padded
    length, text.max_length: attention runs over every position, masked or not).
    """
    n, d, depth = num_tokens(model, latent_shape), model.width, model.depth
    hidden = int(d * model.mlp_ratio)  # as blocks.Mlp builds it
    cross = model.has_text and model.cross_attention
    if cross and text_length < 1:
        raise ValueError("this model attends to text: give text_length, the number of text tokens (text.max_length).")
    matmul = lambda rows, inner, cols: FLOPS_PER_MULTIPLY_ADD * rows * inner * cols  # (rows, inner) @ (inner, cols)
    patch_features = math.prod(model.patch)
    parts = {
        "patch_embed": matmul(n, patch_features * model.in_channels, d),
        "condition": matmul(1, model.frequency_dim, d) + matmul(1, d, d)  # timestep MLP
        + (matmul(1, model.text_dim, d) + matmul(1, d, d) if model.has_text else 0),  # pooled-text MLP
        "self_attention": depth * (matmul(n, d, 3 * d) + matmul(n, d, d)),  # qkv, proj
        "attention_scores": depth * 2 * matmul(n, d, n),  # q k^T and p v, all heads together
        "mlp": depth * (matmul(n, d, hidden) + matmul(n, hidden, d)),
        "modulation": depth * matmul(1, d, (9 if cross else 6) * d) + matmul(1, d, 2 * d),  # blocks + final layer
        "final_linear": matmul(n, d, patch_features * model.out_channels),
    }
    if cross:
        parts["cross_attention"] = depth * (
            2 * matmul(n, d, d) + matmul(text_length, model.text_dim, 2 * d) + 2 * matmul(n, d, text_length)
        )  # q and proj, kv of the text, scores and values
    return parts


def forward_flops(model: ModelConfig, latent_shape: tuple[int, ...], text_length: int = 0) -> int:
    """One sample's forward FLOPs (multiply-add = 2) of the VideoDiT on latents (T, H, W, C)."""
    return sum(forward_flops_by_part(model, latent_shape, text_length).values())


def train_flops(model: ModelConfig, latent_shape: tuple[int, ...], text_length: int = 0) -> int:
    """One sample's FLOPs in a training step: 3 x forward."""
    return TRAIN_FORWARD_EQUIVALENTS * forward_flops(model, latent_shape, text_length)
