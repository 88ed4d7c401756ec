"""Memory per device of one guided denoising step of Wan 2.1's transformer on a mesh, from XLA's own
account of the compiled program: nothing is allocated, so it runs on a CPU with simulated devices.

    python benchmarks/wan_memory.py                                   # 1.3B and 14B, 480x832x81, 3 layouts x 2 dtypes
    python benchmarks/wan_memory.py --variants wan14B --layouts 2x4 --param-dtypes bfloat16

The step is what `jaxdit.pipeline.VideoSampler` runs at every denoising step: the VideoDiT with Wan's
layout (`WAN_LAYOUT`, 16 latent channels, 4096-wide umT5 features) on the [conditional; unconditional]
pair of each video (`sampling.guide`), over a (data, fsdp, context) mesh of `--devices` devices
(`--layouts FSDPxCONTEXT`): parameters split over fsdp (`jaxdit.sharding.state_sharding`, stored in
each of `--param-dtypes`), each video's tokens over context (`jaxdit.context_parallel`), one video per
data x fsdp group (the sampler's smallest batch: every device runs one video's pair of passes).
Computation in `--dtype` (bfloat16), blocks scanned (`model.scan_layers`), no remat (no backward pass).
480x832x81 video is 21x60x104x16 latents (Wan's VAE: 4x8x8), 21x30x52 = 32,760 tokens of 1x2x2 patches;
the caption is 512 umT5 tokens in bfloat16.

Columns: `arguments` (parameters, latents, text), `temp` (activations, gathered parameters, workspace),
`total` = arguments + outputs + temp - aliased (`jaxdit.benchmarking.compiled_memory`). The self-attention
that compiles here is XLA's ("xla": CPU has no fused kernel), which holds (heads, queries, keys) float32
scores: at 32,760 tokens that is most of `temp`. `temp, no scores` compiles the same step with the local
attention replaced by a stand-in that keeps no scores, as a fused flash kernel (cuDNN on GPU) keeps none:
an estimate of a GPU's figure, not a measurement. A ring's blocks (`ulysses_ring` where the heads do not
split over the whole context axis) are XLA math on every backend, so their scores stay in both columns.
Without a context axis the attention is XLA's outside a shard_map, which XLA:CPU fuses into one loop
nest that keeps no scores either; there nothing in the model pins the activations to the batch's split,
and XLA's sharding propagation follows the split weights instead: at fsdp 8 each device computes all 16
passes of the 8 videos for a share of the heads (1.3B: 3 of 12, 14B: 5 of 40), gathering activations
rather than weights (the `8 x 1` rows' `temp`).
"""

import argparse
import contextlib
import datetime
import math
import os
import pathlib
import platform
import sys
import time

LATENTS = (21, 60, 104, 16)  # 480x832x81 through Wan's VAE: (T, H, W, C)
TEXT_TOKENS, TEXT_DIM = 512, 4096  # umT5-XXL features, padded to 512
CFG_SCALE = 5.0  # Wan's default guidance; the memory does not depend on it
GB = 1e9
# XLA:CPU has no bfloat16 matrix product: it converts bfloat16 operands to float32, and this pass then hoists
# that conversion of every layer's stacked parameters out of the scan, a float32 copy of all of them in `temp`.
# A GPU multiplies bfloat16 directly, so the benchmark compiles without it (--hoist: with it).
HOISTING_PASS = "while-loop-invariant-code-motion"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", default="wan1.3B,wan14B", help="comma-separated: wan1.3B, wan14B")
    parser.add_argument("--layouts", default="8x1,2x4,1x8", help="comma-separated FSDPxCONTEXT meshes")
    parser.add_argument("--param-dtypes", default="float32,bfloat16", help="comma-separated parameter dtypes")
    parser.add_argument("--dtype", default="bfloat16", help="the computation dtype (model.dtype)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the mesh's size)")
    parser.add_argument("--latents", default="x".join(map(str, LATENTS)), help="one video's latents TxHxWxC")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    parser.add_argument("--no-stand-in", action="store_true", help="skip the `temp, no scores` compile")
    parser.add_argument("--hoist", action="store_true", help=f"keep XLA's {HOISTING_PASS} pass (see HOISTING_PASS)")
    return parser.parse_args(argv)


def simulate_devices(count: int, *, hoist: bool) -> None:
    """`count` CPU devices (a device count already in XLA_FLAGS wins), and unless `hoist` XLA's loop-invariant
    code motion off (HOISTING_PASS); set before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={count}"
    if not hoist:
        flags += f" --xla_disable_hlo_passes={HOISTING_PASS}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_config(variant: str, dtype: str):
    """Wan 2.1 T2V's ModelConfig (as `jaxdit.convert.wan.wan_model_config` makes it), its blocks scanned."""
    from jaxdit.model_config import WAN_LAYOUT, WAN_MLP_WIDTHS, ModelConfig

    return ModelConfig(
        variant=f"{variant}/1x2x2", in_channels=LATENTS[-1], text_dim=TEXT_DIM, mlp_width=WAN_MLP_WIDTHS[variant],
        dtype=dtype, scan_layers=True, remat="none", **WAN_LAYOUT,
    )


def abstract_params(model, mesh, param_dtype: str):
    """(graphdef, the VideoDiT's parameters as ShapeDtypeStructs in `param_dtype`, split as the sampler splits them)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdit.model import VideoDiT
    from jaxdit.sharding import state_sharding

    graphdef, params = nnx.split(nnx.eval_shape(lambda: VideoDiT(model, rngs=nnx.Rngs(0))))
    stored = lambda x: param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, stored(x), sharding=s), params, state_sharding(params, mesh)
    )


def guided_step(graphdef, mesh):
    """The jitted step: (params, latents (B, T, H, W, C), t (B,), text and null text (B, L, E)) -> guided prediction."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdit import context_parallel, sampling

    def step(params, x, t, text, null):
        model = nnx.merge(graphdef, params)
        pair = jnp.concatenate([text, null])  # (2B, L, E): conditional halves first
        mask = jnp.ones(pair.shape[:2], bool)  # (2B, L): Wan attends every (zero-padded) token
        denoise = lambda x2, t2: model(x2, t2, text=pair, text_mask=mask)  # (2B, T, H, W, C)
        return sampling.guide(denoise, CFG_SCALE, x.shape[-1])(x, t)  # (B, T, H, W, C)

    return jax.jit(context_parallel.traced_on(mesh, step))


def inputs(batch: int, latents: tuple, text_tokens: int, mesh):
    """The step's data arguments as ShapeDtypeStructs, split over the batch as the sampler splits them."""
    import jax
    import jax.numpy as jnp

    from jaxdit.sharding import batch_sharding

    split = batch_sharding(mesh)
    text = jax.ShapeDtypeStruct((batch, text_tokens, TEXT_DIM), jnp.bfloat16, sharding=split)  # frozen umT5's output
    return (
        jax.ShapeDtypeStruct((batch, *latents), jnp.float32, sharding=split),
        jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=split), text, text,
    )


def no_scores(q, k, v, *, mask=None, implementation="auto"):
    """A stand-in for attention with its output's shape and dependencies but no (heads, N, L) scores."""
    return q + (k.mean(axis=1, keepdims=True) + v.mean(axis=1, keepdims=True)).astype(q.dtype)  # (B, N, K, Dh)


@contextlib.contextmanager
def scoreless_attention(active: bool = True):
    """Within it (when `active`), the model's local attention (the one a fused kernel runs) is `no_scores`."""
    from jaxdit import blocks, context_parallel

    patched = (blocks, context_parallel)
    original = [module.attention for module in patched]
    if active:
        for module in patched:
            module.attention = no_scores
    try:
        yield
    finally:
        for module, function in zip(patched, original, strict=True):
            module.attention = function


def compile_memory(graphdef, mesh, args, *, stand_in: bool) -> tuple[dict, float]:
    """XLA's memory account of the step compiled for `args`, and the compile's seconds; with `stand_in` the
    local attention is `no_scores`. A new jit each time: it is traced anew."""
    from jaxdit import benchmarking

    with scoreless_attention(stand_in):
        start = time.perf_counter()
        compiled = guided_step(graphdef, mesh).lower(*args).compile()
        seconds = time.perf_counter() - start
    return benchmarking.compiled_memory(compiled), seconds


def measure(variant: str, fsdp: int, context: int, param_dtype: str, args) -> dict:
    """One row: the memory of the step of `variant` on an fsdp x context mesh with parameters in `param_dtype`."""
    import jax
    import numpy as np

    from jaxdit.attention import resolve_implementation
    from jaxdit.options import context_degrees
    from jaxdit.sharding import data_parallel_size, make_mesh

    model = model_config(variant, args.dtype)
    mesh = make_mesh(fsdp, devices=jax.devices()[: args.devices], context=context)
    graphdef, params = abstract_params(model, mesh, param_dtype)
    latents = tuple(int(n) for n in args.latents.split("x"))
    tokens = math.prod(n // p for n, p in zip(latents[:3], model.patch, strict=True))
    data = inputs(data_parallel_size(mesh), latents, args.text_tokens, mesh)
    memory, seconds = compile_memory(graphdef, mesh, (params, *data), stand_in=False)
    stand_in = None if args.no_stand_in else compile_memory(graphdef, mesh, (params, *data), stand_in=True)[0]

    on_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    ulysses, ring = context_degrees(model.context_attention, model.heads, context)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the step is traced: splash runs per device there
        attention = resolve_implementation(model.attention, model.dtype, model.width // model.heads, (tokens, tokens))
    return {
        "variant": variant, "fsdp": fsdp, "context": context, "data": mesh.shape["data"],
        "attention": f"{attention} (ulysses {ulysses} x ring {ring})" if context > 1 else attention,
        "param_dtype": param_dtype, "params": sum(x.size for x in jax.tree.leaves(params)),
        "param_bytes_per_device": on_device, "tokens": tokens, "compile_s": seconds,
        "arguments": memory["argument_bytes"], "temp": memory["temp_bytes"], "total": memory["memory_per_device_bytes"],
        "temp_no_scores": None if stand_in is None else stand_in["temp_bytes"],
        "total_no_scores": None if stand_in is None else stand_in["memory_per_device_bytes"],
        "itemsize": np.dtype(param_dtype).itemsize,
    }


def print_arithmetic(rows: list[dict]) -> None:
    """Parameter memory per device: parameters x bytes / fsdp, beside the exact figure (small ones are whole)."""
    print("\nparameter memory per device (parameters x bytes / fsdp; exact: small arrays are not split)")
    for row in rows:
        naive = row["params"] * row["itemsize"] / row["fsdp"]
        print(f"  {row['variant']:<8} {row['params'] / 1e9:.3f} B x {row['itemsize']} B / fsdp {row['fsdp']} = "
              f"{naive / GB:6.2f} GB   (exact {row['param_bytes_per_device'] / GB:6.2f} GB)")


def print_table(rows: list[dict]) -> None:
    shown = lambda b: "n/a" if b is None else f"{b / GB:.2f}"
    print("\n| model | fsdp x context | self-attention (CPU) | parameters | arguments GB | temp GB | total GB | "
          "temp, no scores GB | total, no scores GB | compile s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['fsdp']} x {r['context']} | {r['attention']} | {r['param_dtype']} | "
              f"{shown(r['arguments'])} | {shown(r['temp'])} | {shown(r['total'])} | {shown(r['temp_no_scores'])} | "
              f"{shown(r['total_no_scores'])} | {r['compile_s']:.0f} |")


def cpu_name() -> str:
    """The processor's model name (Linux), else the machine type."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    simulate_devices(args.devices, hoist=args.hoist)
    import jax

    from jaxdit.model_config import WAN_MLP_WIDTHS

    unknown = set(args.variants.split(",")) - set(WAN_MLP_WIDTHS)
    if unknown:
        raise SystemExit(f"unknown --variants {', '.join(sorted(unknown))}: use {', '.join(WAN_MLP_WIDTHS)}.")

    rows = []
    for variant in args.variants.split(","):
        for layout in args.layouts.split(","):
            fsdp, context = (int(n) for n in layout.split("x"))
            for param_dtype in args.param_dtypes.split(","):
                rows.append(measure(variant, fsdp, context, param_dtype, args))
                print(f"{variant} fsdp {fsdp} x context {context}, {param_dtype} parameters: total "
                      f"{rows[-1]['total'] / GB:.2f} GB (compiled in {rows[-1]['compile_s']:.0f} s)", flush=True)
    print(f"\ncommand: python benchmarks/wan_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {args.devices} simulated "
          f"CPU devices; jax {jax.__version__}; {datetime.date.today().isoformat()}")
    print(f"step: one guided denoising step, latents {args.latents} a video ({rows[0]['tokens']:,} tokens), "
          f"{args.text_tokens} text tokens, computation in {args.dtype}")
    print_table(rows)
    print_arithmetic(rows)
    return rows


if __name__ == "__main__":
    main()
