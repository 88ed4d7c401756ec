"""Generation speed: seconds per video and per denoising step of the jitted sampler.

    python benchmarks/sample.py                                                 # configs/shapes_tiny.py, 50 DDIM steps, cfg 4
    python benchmarks/sample.py --config configs/shapes.py --batch-size 16 --out results.jsonl
    python benchmarks/sample.py --config configs/shapes.py --sampler ddpm --steps 250 --cfg-scale 1 --dtype bfloat16
    python benchmarks/sample.py --config configs/shapes.py --model.variant XL/1x2x2 --sd-vae --num-frames 16 --size 256 \
        --dtype bfloat16 --batch-size 1        # XL text-to-video, 16x256x256: 4096 tokens, SD-VAE decode included

The program is `jaxdit.pipeline.VideoSampler`, the one sample.py, Pipeline and train.py's
previews run: prompt encoding, the reverse diffusion as one `lax.scan` with classifier-free
guidance batched into each forward pass (cfg scale 1: one pass), the frozen codec's decode and
the copy of the uint8 videos to the host. The weights are a fresh initialisation
(`create_train_state`, no checkpoint needed: the time does not depend on their values). One
call makes `--batch-size` videos; the first call traces and compiles (`compile_s` = first
call - a warm call), then `--repeats` warm calls are timed and their median reported.

FLOPs are the VideoDiT's forward FLOPs (`jaxdit.flops`) x steps (x 2 with guidance) per video;
the codec's decode and the text encoder are run and timed but not counted, so the MFU is
that of the whole program. MFU is null where the device's peak is unknown (CPU). Any other
`--section.field VALUE` overrides the config. Prints a table; `--out F` appends one JSON line.
Figures are printed, never asserted.
"""

import argparse
import math
import statistics
import time

PROMPTS = ("a large red circle moving left", "a small blue square moving up", "a large green triangle moving right")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any other --section.field VALUE overrides that config field, as in train.py.",
    )
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--sampler", default="", help="ddim or ddpm (DDPM runs), euler or heun (flow runs); default: the run's")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance; 1: off (one pass)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    parser.add_argument("--batch-size", type=int, help="videos per call (default: one per local device)")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: data.num_frames)")
    parser.add_argument("--size", type=int, help="pixels per side (default: data.size)")
    parser.add_argument("--dtype", help="model.dtype: float32, bfloat16, float16")
    parser.add_argument("--attention", help="model.attention: auto, xla, cudnn")
    parser.add_argument("--sd-vae", action="store_true", help="decode with a full-size SD-VAE of random weights "
                        "(8x smaller 4-channel latents; the time does not depend on the weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--out", help="append the figures to this JSON-lines file")
    args, overrides = parser.parse_known_args(argv)
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--repeats and --batch-size must be at least 1.")
    return args, overrides


def prompts_for(config, count: int) -> list[str]:
    """Captions for a text model, class indices for a class-conditional one."""
    if config.model.has_text or not config.model.num_classes:
        return [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    return [str(i % config.model.num_classes) for i in range(count)]


def random_sd_vae():
    """Stable Diffusion's VAE (diffusers' default AutoencoderKL sizes) with random weights, made in one jit."""
    import jax
    from flax import nnx

    from jaxdit.codec.sd_vae import SDVAE

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: SDVAE(rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, *jax.jit(lambda: nnx.split(SDVAE(rngs=nnx.Rngs(0)))[1:])())


def run(config, args) -> dict:
    import jax

    from jaxdit import benchmarking, flops, sampling
    from jaxdit.codec import make_codec
    from jaxdit.pipeline import VideoSampler
    from jaxdit.sharding import make_mesh
    from jaxdit.train_step import abstract_train_state, create_train_state, model_graphdef

    model, data = config.model, config.data
    mesh = make_mesh(1, devices=jax.local_devices())  # as Pipeline: parameters replicated, samples split
    codec = random_sd_vae() if args.sd_vae else make_codec(config.codec)
    state = create_train_state(config, abstract_train_state(config, mesh))  # a fresh initialisation
    shardings = jax.tree.map(lambda x: x.sharding, state.ema)
    sampler = VideoSampler(config, model_graphdef(config), codec, mesh, shardings)
    batch_size = args.batch_size or mesh.size
    prompts = prompts_for(config, batch_size)
    latent_shape = sampler.latent_shape(data.num_frames, data.size, data.size)
    sampler_name = sampling.check_sampler(args.sampler, args.steps, config.diffusion.num_steps, config.diffusion.process)
    kwargs = dict(
        seed=config.train.seed, sampler=sampler_name, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale,
        num_frames=data.num_frames, height=data.size, width=data.size, batch_size=batch_size,
    )

    start = time.perf_counter()
    videos = sampler(state.ema, state.model_rngs, prompts, **kwargs)  # traces, compiles and runs
    first_call = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        videos = sampler(state.ema, state.model_rngs, prompts, **kwargs)  # uint8 (B, T, H, W, 3) on the host
        times.append(time.perf_counter() - start)

    call = statistics.median(times)
    guided = bool(model.has_text or model.num_classes) and args.cfg_scale != 1.0  # as VideoSampler decides
    text_length = config.text.max_length if model.has_text else 0
    flops_per_video = sampling.evaluations(sampler_name, args.steps) * (2 if guided else 1) * flops.forward_flops(model, latent_shape, text_length)
    videos_per_s = batch_size / call
    tokens = flops.num_tokens(model, latent_shape)
    return benchmarking.describe("sample", config, mesh.size, tokens, mesh) | {
        "codec": codec.kind + (" (random weights)" if args.sd_vae else ""),
        "sampler": sampler_name,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "guided": guided,
        "eta": args.eta,
        "batch_size": batch_size,
        "padded_batch": mesh.size * math.ceil(batch_size / mesh.size),  # VideoSampler pads to the devices
        "num_frames": data.num_frames,
        "size": data.size,
        "video_shape": list(videos.shape[1:]),
        "latent_shape": list(latent_shape),
        "tokens_per_sample": tokens,
        "dtype": model.dtype,
        "flops_per_video": flops_per_video,
        "compile_s": max(first_call - call, 0.0),
        "first_call_s": first_call,
        "seconds_per_call": call,
        "seconds_per_video": call / batch_size,
        "seconds_per_step": call / args.steps,
        "videos_per_s": videos_per_s,
        "repeats": args.repeats,
    } | benchmarking.rate_figures(flops_per_video, videos_per_s, mesh.size)


def main(argv=None) -> dict:
    from jaxdit import benchmarking

    args, overrides = parse_args(argv)
    named = {
        "data.num_frames": args.num_frames, "data.size": args.size, "model.dtype": args.dtype,
        "model.attention": args.attention, "model.in_channels": 4 if args.sd_vae else None,
    }
    config, flags = benchmarking.build_config(args.config, overrides, named)
    record = run(config, args)
    return benchmarking.report(record, config_file=args.config, flags=flags, out=args.out)


if __name__ == "__main__":
    main()
