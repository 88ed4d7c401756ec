"""Memory per device of a Wan 2.1 fine-tuning step, full and LoRA, on 1, 8 and 64 devices, from XLA's own
account of the compiled train step: nothing is allocated, so it runs on a CPU with simulated devices. With
`--time`, the step also runs, on real arrays, and its median time is measured.

    python benchmarks/wan_finetune.py                          # 1.3B and 14B, full and LoRA, 5 layouts
    python benchmarks/wan_finetune.py --variants wan1.3B --modes lora --layouts 8x8x1
    python benchmarks/wan_finetune.py --variants wan1.3B --depth 2 --layouts 1x1x1 --latents 3x16x16x16 \
        --text-tokens 64 --time 5                               # CPU: a LoRA step against a full step, 1.3B wide

The step is train.py's (`jaxdit.train_step.make_train_step`: flow matching with Wan's velocity target, AdamW,
the EMA; compiled from shapes alone as `train.compile_only` and `benchmarks/train.py --compile-only` compile
it) on a latent cache's batches: 480x832x81 clips as 21x60x104x16 latents (32,760 tokens) and 512 umT5
features, so neither the VAE nor umT5 is in the step. The model is Wan 2.1 T2V (`WAN_LAYOUT`), computing in
bfloat16, every block rematerialised, the blocks scanned; what trains (every weight, or the LoRA adapters),
its Adam moments and its EMA are float32. LoRA (`--modes lora`): rank `--lora-rank` on `--lora-targets`, the
frozen base weights in `--lora-base-dtype`. A layout DEVICESxFSDPxCONTEXT is a (data, fsdp, context) mesh:
parameters split over fsdp, each clip's tokens over context, one clip per data x fsdp group.

Self-attention is measured with a stand-in that keeps no (heads, N, N) scores (`wan_memory.no_scores`), as the
fused kernels the step runs on accelerators keep none (splash on TPU, cuDNN on GPU); XLA:CPU's own attention
would hold 4 GB of float32 scores per head at 32,760 tokens, which no accelerator run holds. So the figures
are an estimate of an accelerator's, not a measurement of one. `fits` names the devices whose memory holds
`total` with 10% to spare: a 16 GiB and a 95 GiB TPU chip (v5e, v5p), an 80 GiB GPU (H100).
"""

import argparse
import datetime
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # wan_memory.py, beside this file, however this one is loaded
import wan_memory  # noqa: E402

DEVICES = {"TPU v5e 16 GiB": 16, "H100 80 GiB": 80, "TPU v5p 95 GiB": 95}
HEADROOM = 0.9  # the share of a device's memory a step may plan to use
GIB = 2**30


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", default="wan1.3B,wan14B", help="comma-separated: wan1.3B, wan14B")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--layouts", default="1x1x1,8x8x1,8x1x8,64x64x1,64x8x8",
                        help="comma-separated DEVICESxFSDPxCONTEXT meshes")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lora-targets", default="attn,cross,mlp")
    parser.add_argument("--lora-base-dtype", default="bfloat16")
    parser.add_argument("--latents", default="x".join(map(str, wan_memory.LATENTS)), help="one clip's latents TxHxWxC")
    parser.add_argument("--text-tokens", type=int, default=wan_memory.TEXT_TOKENS)
    parser.add_argument("--depth", type=int, help="blocks (default: the variant's): the variant's width and heads")
    parser.add_argument("--time", type=int, default=0, metavar="STEPS",
                        help="also run the step: 2 untimed, then STEPS timed (median), real attention, random weights")
    return parser.parse_args(argv)


def train_config(variant: str, mode: str, fsdp: int, context: int, batch: int, args):
    """The Config of a fine-tuning run of `variant` on a latent cache, for one layout."""
    import dataclasses

    from jaxdit.config import Config, DiffusionConfig, TextConfig, TrainConfig

    model = dataclasses.replace(wan_memory.model_config(variant, "bfloat16"), remat="full")
    if args.depth:  # the variant's width and heads, fewer blocks
        model = dataclasses.replace(model, variant=f"{model.width}x{args.depth}x{model.heads}/1x2x2")
    lora = dict(lora_rank=args.lora_rank, lora_targets=args.lora_targets, lora_base_dtype=args.lora_base_dtype)
    return Config(
        name=f"{variant}_{mode}", model=model, diffusion=DiffusionConfig(process="flow", prediction="v", shift=3.0),
        text=TextConfig(encoder="t5", max_length=args.text_tokens),
        train=TrainConfig(batch_size=batch, fsdp=fsdp, context=context, **(lora if mode == "lora" else {})),
    )


def abstract_batch(batch: int, latents: tuple, text_tokens: int, mesh) -> dict:
    """A latent cache's global batch as ShapeDtypeStructs, split over the mesh as train.py splits it."""
    import jax
    import jax.numpy as jnp

    from jaxdit.sharding import batch_sharding

    split = batch_sharding(mesh)
    return {
        "latents": jax.ShapeDtypeStruct((batch, *latents), jnp.float32, sharding=split),  # (B, T, H, W, C)
        "text_features": jax.ShapeDtypeStruct((batch, text_tokens, wan_memory.TEXT_DIM), jnp.bfloat16, sharding=split),
        "text_mask": jax.ShapeDtypeStruct((batch, text_tokens), jnp.bool_, sharding=split),  # (B, L)
    }


def measure(variant: str, mode: str, devices: int, fsdp: int, context: int, args) -> dict:
    """One row: the memory per device of the train step of `variant` (`mode`) on a DEVICESxFSDPxCONTEXT mesh."""
    import jax
    from flax import nnx

    from jaxdit import benchmarking
    from jaxdit.codec import IdentityCodec
    from jaxdit.sharding import data_parallel_size, make_mesh
    from jaxdit.train_step import abstract_base, abstract_train_state, make_train_step, model_graphdef

    mesh = make_mesh(fsdp, devices=jax.devices()[:devices], context=context)
    batch = data_parallel_size(mesh)
    config = train_config(variant, mode, fsdp, context, batch, args)
    state, base = abstract_train_state(config, mesh), abstract_base(config, mesh)
    codec = IdentityCodec()
    latents = tuple(int(n) for n in args.latents.split("x"))
    inputs = (state, abstract_batch(batch, latents, args.text_tokens, mesh), jax.random.key(0), nnx.state(codec),
              nnx.State({}), base)
    with wan_memory.scoreless_attention(not args.time):  # a timed step runs the real attention
        start = time.perf_counter()
        step = make_train_step(config, model_graphdef(config), codec, mesh, state)
        compiled = step.lower(*inputs).compile()
        seconds = time.perf_counter() - start
    memory = benchmarking.compiled_memory(compiled)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    total = memory["memory_per_device_bytes"]
    return {
        "variant": config.model.variant.split("/")[0] if args.depth else variant, "mode": mode, "devices": devices,
        "fsdp": fsdp, "context": context, "batch": batch, "trained": count(state.params), "frozen": count(base),
        "arguments": memory["argument_bytes"], "temp": memory["temp_bytes"], "total": total, "compile_s": seconds,
        "fits": [name for name, gib in DEVICES.items() if total <= HEADROOM * gib * GIB],
        "step_s": time_steps(compiled, config, inputs, args.time, mesh) if args.time else None,
    }


def time_steps(compiled, config, inputs, steps: int, mesh) -> float:
    """The median seconds of `steps` steps of `compiled` (after 2 untimed ones) on random arrays of `inputs`' shapes."""
    import statistics

    import jax

    from jaxdit import benchmarking
    from jaxdit.train_step import create_train_state

    abstract, batch, _, codec_state, text_state, _ = inputs
    state = create_train_state(config, abstract)
    base = benchmarking.random_base(config, mesh)
    arrays = {name: jax.device_put(jax.random.normal(jax.random.key(1), spec.shape).astype(spec.dtype) if
                                   spec.dtype != bool else jax.numpy.ones(spec.shape, bool), spec.sharding)
              for name, spec in batch.items()}
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = compiled(state, arrays, jax.random.key(i), codec_state, text_state, base)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def print_table(rows: list[dict]) -> None:
    timed = rows[0]["step_s"] is not None
    print("\n| model | mode | devices (fsdp x context) | global batch | trained / frozen parameters | arguments GiB | "
          f"temp GiB | total GiB | {'step s' if timed else 'fits'} |")
    print("|---|---|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        last = f"{r['step_s']:.3f}" if timed else ", ".join(r["fits"]) or "none"
        print(f"| {r['variant']} | {r['mode']} | {r['devices']} ({r['fsdp']} x {r['context']}) | {r['batch']} | "
              f"{r['trained'] / 1e6:,.1f} M / {r['frozen'] / 1e9:.2f} B | {r['arguments'] / GIB:.2f} | "
              f"{r['temp'] / GIB:.2f} | {r['total'] / GIB:.2f} | {last} |")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    wan_memory.simulate_devices(max(devices for devices, _, _ in layouts), hoist=False)
    import jax

    rows = []
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            for devices, fsdp, context in layouts:
                rows.append(measure(variant, mode, devices, fsdp, context, args))
                print(f"{variant} {mode} on {devices} devices (fsdp {fsdp} x context {context}): total "
                      f"{rows[-1]['total'] / GIB:.1f} GiB (compiled in {rows[-1]['compile_s']:.0f} s)", flush=True)
    print(f"\ncommand: python benchmarks/wan_finetune.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          .rstrip())
    print(f"machine: {wan_memory.cpu_name()}, {os.cpu_count()} cores, simulated CPU devices; jax {jax.__version__}; "
          f"{datetime.date.today().isoformat()}")
    print(f"step: latents {args.latents} per clip, {args.text_tokens} text tokens; LoRA rank {args.lora_rank} on "
          f"{args.lora_targets}, base in {args.lora_base_dtype}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
