"""Training speed of the real jitted train step on synthetic data: samples/s, tokens/s, TFLOP/s, MFU.

    python benchmarks/train.py                                                  # configs/shapes_tiny.py at its batch size
    python benchmarks/train.py --config configs/shapes.py --batch-size 64 --out results.jsonl
    python benchmarks/train.py --config configs/shapes.py --dtype bfloat16 --attention cudnn --remat dots
    python benchmarks/train.py --config configs/shapes.py --scan-layers      # compare compile_s with and without
    python benchmarks/train.py --config configs/shapes.py --profile /tmp/prof  # + a jax.profiler trace of 3 steps
    python benchmarks/train.py --config configs/shapes.py --fsdp 8 --model.variant B/2x4x4 --num-frames 32
    python benchmarks/train.py --config configs/dit_xl2_256.py --latents --num-frames 1 --size 32 --batch-size 32
                                                          # DiT-XL/2 at 256x256: 32x32x4 latents, as from a latent cache
    python benchmarks/train.py --config configs/tiny.py --latents --num-frames 16 --size 64 --context 4 --batch-size 2
                                                          # each clip's tokens split over 4 devices (context parallelism)
    python benchmarks/train.py --config configs/tiny.py --latents --num-frames 16 --size 64 --compile-only
                                                          # memory per device only: compile, do not run

The step is `jaxdit.train_step.make_train_step`, the one train.py runs (frozen codec encode,
text encoder, VideoDiT, loss, AdamW, EMA) over the same (data, fsdp, context) mesh. It is compiled ahead
of time (`compile_s`), run `--warmup` times, then `--steps` times, each step waited for with
block_until_ready; `step_time_s` is the median. Batches are random uint8 videos (or, with
`--latents`, latents: no codec in the step, as with a latent cache) and random caption tokens
made directly on the devices, so data loading and host-to-device copies are not timed.

FLOPs are model FLOPs (`jaxdit.flops`): 3 x the VideoDiT's forward, multiply-add = 2, the
codec and text encoder not counted. MFU = flops_per_sample x samples/s / (devices x dense bf16
peak), null where the peak is unknown (CPU). Memory per device is XLA's account of the compiled
program (`memory_per_device_bytes` = arguments + outputs + temporaries, `temp_bytes` the
activations and gradients among them), so it is known on CPU too and needs no run
(`--compile-only`); `peak_memory_bytes` is the allocator's peak where the device keeps one. Any other `--section.field VALUE` overrides the
config as in train.py. Prints a table; `--out F` appends the figures as one JSON line.
Figures are printed, never asserted.
"""

import argparse
import statistics
import sys
import time
import warnings

PROFILED_STEPS = 3


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any other --section.field VALUE overrides that config field, as in train.py.",
    )
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    parser.add_argument("--batch-size", type=int, help="global batch (default: train.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--num-frames", type=int, help="frames per clip (default: data.num_frames)")
    parser.add_argument("--size", type=int, help="pixels per side (default: data.size); latents with --latents")
    parser.add_argument("--dtype", help="model.dtype: float32, bfloat16, float16")
    parser.add_argument("--attention", help="model.attention: auto, xla, cudnn")
    parser.add_argument("--remat", help="model.remat: none, full, dots")
    parser.add_argument("--scan-layers", action="store_true", help="model.scan_layers: scan over stacked blocks")
    parser.add_argument("--fsdp", type=int, help="devices per parameter shard (the mesh's fsdp axis)")
    parser.add_argument("--context", type=int, help="devices that split each clip's tokens (train.context): the mesh "
                        "is (devices / (fsdp * context), fsdp, context)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile from shapes alone and report memory per device; nothing is allocated or run")
    parser.add_argument("--latents", action="store_true", help="feed (frames, size, size, in_channels) latents, no codec")
    parser.add_argument("--out", help="append the figures to this JSON-lines file")
    parser.add_argument("--profile", help="after timing, trace 3 more steps with jax.profiler into this folder "
                        "(open with TensorBoard's profile plugin or xprof)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0.")
    return args, overrides


def run(
    config, *, latents: bool, steps: int, warmup: int, profile: str | None = None, compile_only: bool = False
) -> dict:
    import jax

    from jaxdit import benchmarking, flops
    from jaxdit.train_loop import parameter_count

    # Progress on stderr: a compile can take minutes (an XL model on a GPU), and a run cut short should say where.
    print(f"{config.model.variant}: making the state and compiling the train step", file=sys.stderr, flush=True)
    setup = benchmarking.compiled_train_step(config, latents=latents, abstract=compile_only)
    print(f"compiled in {setup['compile_s']:.1f} s", file=sys.stderr, flush=True)
    compiled, state, batch, frozen = setup["step"], setup["state"], setup["batch"], setup["frozen"]
    model, data, latent_shape, mesh = config.model, config.data, setup["latent_shape"], setup["mesh"]
    text_length = config.text.max_length if model.has_text else 0
    tokens = flops.num_tokens(model, latent_shape)
    head = benchmarking.describe("train", config, jax.device_count(), tokens, mesh) | {
        "mesh": dict(mesh.shape),
        "context_attention": model.context_attention if config.train.context > 1 else None,
        "batch_size": config.train.batch_size,
        "num_frames": data.num_frames,
        "size": data.size,
        "input": "latents" if latents else f"video via {config.codec.kind} codec",
        "latent_shape": list(latent_shape),
        "tokens_per_sample": tokens,
        "tokens_per_device": tokens * config.train.batch_size // mesh.size,
        "text_tokens": text_length,
        "dtype": model.dtype,
        "remat": model.remat,
        "scan_layers": model.scan_layers,
        "params": parameter_count(state.params),
        "compile_s": setup["compile_s"],
    } | benchmarking.compiled_memory(compiled)
    if compile_only:
        return head | {"jax": jax.__version__, "backend": jax.default_backend()}
    root = jax.random.key(config.train.seed)
    rngs = jax.block_until_ready([jax.random.fold_in(root, i) for i in range(warmup + steps)])

    times = []
    for i, rng in enumerate(rngs):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, rng, *frozen)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)

    if profile:  # separate from the timed steps, which the tracer would slow
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for rng in rngs[-PROFILED_STEPS:]:
                state, metrics = compiled(state, batch, rng, *frozen)
            jax.block_until_ready((state, metrics))

    step_time = statistics.median(times)
    samples_per_s = config.train.batch_size / step_time
    flops_per_sample = flops.train_flops(model, latent_shape, text_length)
    return head | {
        "flops_per_sample": flops_per_sample,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "samples_per_s": samples_per_s,
        "tokens_per_s": tokens * samples_per_s,
        "loss": float(metrics["loss"]),
        "steps": steps,
        "warmup": warmup,
    } | benchmarking.rate_figures(flops_per_sample, samples_per_s, jax.device_count())


def main(argv=None) -> dict:
    from jaxdit import benchmarking

    args, overrides = parse_args(argv)
    named = {
        "train.batch_size": args.batch_size, "data.num_frames": args.num_frames, "data.size": args.size,
        "model.dtype": args.dtype, "model.attention": args.attention, "model.remat": args.remat, "train.fsdp": args.fsdp,
        "train.context": args.context,
        "model.scan_layers": True if args.scan_layers else None,  # not given: the config's own setting
    }
    config, flags = benchmarking.build_config(args.config, overrides, named)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # CPU cannot donate
        record = run(
            config, latents=args.latents, steps=args.steps, warmup=args.warmup, profile=args.profile,
            compile_only=args.compile_only,
        )
    return benchmarking.report(record, config_file=args.config, flags=flags, out=args.out)


if __name__ == "__main__":
    main()
