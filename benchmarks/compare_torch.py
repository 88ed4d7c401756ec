"""jaxdit's train step against PyTorch's DiT, side by side in one run: seconds per step and their ratio.

    pip install -e '.[compare]'                     # torch and diffusers, for this benchmark only
    python benchmarks/compare_torch.py              # DiT-S/2 on 32x32x4 latents, batch 8 (DiT's 256px model, S size)
    python benchmarks/compare_torch.py --preset default     # the default run's width, depth and token count
    python benchmarks/compare_torch.py --rounds 5 --steps 5 --out compare.jsonl
    python benchmarks/compare_torch.py --parts      # also one block's parts, timed alone on each side

Both sides train the same network on the same batch with the same objective and optimizer, on CPU:
- the network: a class-conditional DiT (adaLN-Zero, 1000 classes + null) in float32, with the
  same parameters. jaxdit runs its VideoDiT of one frame; PyTorch runs diffusers'
  `DiTTransformer2DModel`, an implementation of DiT independent of jaxdit (tests/fixtures/dit
  checks the two agree), with DiT's zero initialisation of the adaLN modulations and the final
  layer, and one timestep and class embedder shared by every block, as DiT's (diffusers gives each
  block its own, and still runs it in each block: under 1% of the step at these sizes);
- the objective: DDPM with jaxdit's linear schedule (DiT's), a uniform step per sample, labels
  dropped to the null class with probability 0.1 once per sample, the MSE of the predicted noise
  (no learned variance on either side);
- the optimizer: AdamW at 1e-4 without weight decay or clipping, then an EMA of the parameters
  (decay 0.9999), as DiT's train.py does after every step.
jaxdit's step is train.py's (`jaxdit.train_step`), jitted once. It also does what train.py needs
and the PyTorch loop skips: it skips non-finite updates (`optax.apply_if_finite`, and the EMA
with them) and reports gradient and parameter norms, a few passes over the parameters. The
PyTorch step runs eagerly, as DiT's train.py does. Batches are random latents made once, so no
data loading is timed. `default` is the default run's width, depth, heads and token count
(configs/shapes_tiny.py), class-conditional, without its text encoder, RoPE or QK-norm.

After compiling, one step on each side (whose losses are printed: both predict zero noise at
first, so both are the mean squared noise, about 1) and `--warmup` steps more, the two are timed in alternating rounds of
`--steps` steps each, so that a machine's drifts hit both alike. Prints the median seconds per
step of each and `speedup` = PyTorch's median / jaxdit's (above 1: jaxdit is faster). Figures
are printed, never asserted.

`--parts` then says where the ratio comes from: at the preset's shapes, each side times alone (the
fastest of at least 10 calls)
(a) the dense layers' matrix products of one block (qkv, proj, fc1, fc2: forward `x W`, input
gradient `dy W^T`, weight gradient `x^T dy`) and prints their GFLOP/s, (b) attention forward plus
backward (jaxdit's "xla" attention; PyTorch's `scaled_dot_product_attention`, which diffusers
runs), and (c) one whole block forward plus backward (jaxdit's DiTBlock; diffusers'
BasicTransformerBlock, which also runs its timestep and class embedder).
"""

import argparse
import copy
import statistics
import time

# name -> (jaxdit variant, in_channels, latent side, batch): the same trunk on both sides.
PRESETS = {
    "dit_s2": ("S/2", 4, 32, 8),  # DiT-S/2 at 256x256: 32x32x4 SD-VAE latents, 256 tokens
    # configs/shapes_tiny.py's width 128, 4 blocks, 4 heads and 64 tokens of 2*8*8*3 = 384 features
    # (here 8x8 patches of 2x2 latents of 96 channels), at its batch.
    "default": ("mini/2", 96, 16, 16),  # class-conditional: no text encoder, cross-attention, RoPE or QK-norm
    "tiny": ("tiny/2", 4, 8, 8),  # for the test suite
}
NUM_CLASSES = 1000
LEARNING_RATE, EMA_DECAY, LABEL_DROPOUT = 1e-4, 0.9999, 0.1
DIT_NORM_EPS = 1e-6  # DiT's LayerNorm eps (diffusers' default is 1e-5)


def jaxdit_config(preset: str, batch_size: int):
    from jaxdit import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

    variant, channels, side, _ = PRESETS[preset]
    return Config(
        name=f"compare_{preset}",
        model=ModelConfig(
            variant=variant, in_channels=channels, num_classes=NUM_CLASSES, class_dropout_prob=LABEL_DROPOUT,
            dtype="float32",
        ),
        diffusion=DiffusionConfig(process="ddpm", schedule="linear", prediction="epsilon"),
        data=DataConfig(num_frames=1, size=side),
        train=TrainConfig(
            batch_size=batch_size, learning_rate=LEARNING_RATE, weight_decay=0.0, grad_clip=0.0, ema_decay=EMA_DECAY,
            warmup_steps=0,
        ),
    )


def jaxdit_stepper(config, count: int):
    """One jaxdit train step per call (waited for), for up to `count` calls: the step function, and
    `jaxdit.benchmarking.compiled_train_step`'s record with the parameter count added."""
    import jax

    from jaxdit import benchmarking
    from jaxdit.train_loop import parameter_count

    setup = benchmarking.compiled_train_step(config, latents=True)
    compiled, batch, frozen = setup["step"], setup["batch"], setup["frozen"]
    keys = iter(jax.random.split(jax.random.key(config.train.seed), count))  # made before any step is timed
    holder = {"state": setup["state"]}

    def step() -> float:
        holder["state"], metrics = compiled(holder["state"], batch, next(keys), *frozen)
        return float(jax.block_until_ready(metrics["loss"]))

    return step, setup | {"params": parameter_count(setup["state"].params)}


def torch_stepper(config):
    """One PyTorch DiT train step per call, eager, on the same shapes: the step function, the parameter count."""
    import numpy as np
    import torch
    from diffusers import DiTTransformer2DModel

    from jaxdit.diffusion import make_schedule

    model_config, data = config.model, config.data
    width, heads = model_config.width, model_config.heads
    torch.manual_seed(config.train.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=model_config.in_channels,
        out_channels=model_config.in_channels, num_layers=model_config.depth, sample_size=data.size,
        patch_size=model_config.patch[-1], num_embeds_ada_norm=NUM_CLASSES, norm_eps=DIT_NORM_EPS,
    ).train()
    shared = model.transformer_blocks[0].norm1.emb  # DiT's one timestep + class embedder, for every block
    shared.class_embedder.dropout_prob = 0.0  # labels are dropped once per sample in `step`, as jaxdit does
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    with torch.no_grad():  # DiT's initialize_weights: adaLN modulations and the final layer start at zero
        for name, parameter in model.named_parameters():
            if name.startswith(("proj_out_", "transformer_blocks.")) and ("proj_out" in name or "norm1.linear" in name):
                parameter.zero_()
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    num_steps = config.diffusion.num_steps
    schedule = make_schedule(config.diffusion.schedule, num_steps)  # the one jaxdit trains with
    alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod, np.float32))
    b = config.train.batch_size
    x0 = torch.randn(b, model_config.in_channels, data.size, data.size)  # (B, C, H, W): DiT's layout
    labels = torch.randint(0, NUM_CLASSES, (b,))

    def step() -> float:
        t = torch.randint(0, num_steps, (b,))
        noise = torch.randn_like(x0)
        dropped = torch.rand(b) < LABEL_DROPOUT
        y = torch.where(dropped, NUM_CLASSES, labels)  # the null class
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = model(x_t, timestep=t, class_labels=y).sample  # (B, C, H, W)
        loss = torch.mean((prediction - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # DiT's update_ema: ema = decay * ema + (1 - decay) * param
            torch._foreach_mul_(ema_params, EMA_DECAY)
            torch._foreach_add_(ema_params, params, alpha=1 - EMA_DECAY)
        return loss.item()

    return step, sum(p.numel() for p in params)


def timed(step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def best_ms(run, count: int) -> float:
    """The fastest of `count` calls of `run()` in milliseconds, after two untimed ones: what the part
    takes alone, without the stalls of a shared machine (the steps' medians include them)."""
    run(), run()
    return 1e3 * min(timed(run, count))


def part_figures(config, tokens: int, count: int) -> dict:
    """jaxdit's and PyTorch's times for the parts of one block at the config's shapes, each alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    from flax import nnx

    from jaxdit import host
    from jaxdit.attention import attention
    from jaxdit.blocks import DiTBlock

    width, heads, b = config.model.width, config.model.heads, config.train.batch_size
    m, rng = b * tokens, np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape, np.float32)

    def jax_ms(fn, *args):  # compiled as jaxdit's train step is
        compiled = jax.jit(fn, compiler_options=host.compiler_options(jax.default_backend()))
        args = jax.tree.map(jnp.asarray, args)
        return best_ms(lambda: jax.block_until_ready(compiled(*args)), count)

    products = {"forward": lambda x, w, dy: x @ w, "input_grad": lambda x, w, dy: dy @ w.T,
                "weight_grad": lambda x, w, dy: x.T @ dy}
    layers = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]  # qkv, proj, fc1, fc2
    operands = [(randn(m, d_in), randn(d_in, d_out), randn(m, d_out)) for d_in, d_out in layers]  # (x, w, dy)
    torch_operands = [[torch.from_numpy(a) for a in xwdy] for xwdy in operands]
    gflop = sum(2 * m * d_in * d_out for d_in, d_out in layers) / 1e9
    figures = {}
    for name, product in products.items():  # the four layers' products in one call on each side
        jaxdit_ms = jax_ms(lambda operands, product=product: [product(*xwdy) for xwdy in operands], operands)
        torch_ms = best_ms(lambda product=product: [product(*xwdy) for xwdy in torch_operands], count)
        figures |= {f"dense_{name}_jaxdit_gflops": gflop / jaxdit_ms * 1e3, f"dense_{name}_torch_gflops": gflop / torch_ms * 1e3}

    q, k, v, d_out = (randn(b, tokens, heads, width // heads) for _ in range(4))  # (B, N, K, Dh)
    attention_grad = jax.grad(lambda q, k, v: jnp.vdot(attention(q, k, v, implementation="xla"), d_out), argnums=(0, 1, 2))
    tq, tk, tv, t_out = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v, d_out))  # (B, K, N, Dh)
    tq, tk, tv = (a.requires_grad_() for a in (tq, tk, tv))
    figures["attention_jaxdit_ms"] = jax_ms(attention_grad, q, k, v)
    figures["attention_torch_ms"] = best_ms(
        lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).backward(t_out), count
    )

    x, c, d_x = randn(b, tokens, width), randn(b, width), randn(b, tokens, width)
    graphdef, params = nnx.split(DiTBlock(width, heads, config.model.hidden_width, attention="xla", rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + 0.02 * jnp.asarray(randn(*p.shape)), params)  # live gates, not adaLN-Zero's 0
    block_grad = jax.grad(lambda params, x, c: jnp.vdot(nnx.merge(graphdef, params)(x, c), d_x), argnums=(0, 1, 2))
    figures["block_jaxdit_ms"] = jax_ms(block_grad, params, x, c)
    block = BasicTransformerBlock(
        width, heads, width // heads, activation_fn="gelu-approximate", num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=DIT_NORM_EPS,
    )
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    tx, t_dx = torch.from_numpy(x).requires_grad_(), torch.from_numpy(d_x)
    steps, labels = torch.randint(0, config.diffusion.num_steps, (b,)), torch.randint(0, NUM_CLASSES, (b,))

    def torch_block():
        block.zero_grad(set_to_none=True)  # as the train step's optimizer.zero_grad: no gradients to accumulate into
        block(tx, timestep=steps, class_labels=labels).backward(t_dx)

    figures["block_torch_ms"] = best_ms(torch_block, count)
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="dit_s2")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (jaxdit, then PyTorch)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--parts", action="store_true", help="also time one block's parts alone on each side")
    parser.add_argument("--out", help="append the figures to this JSON-lines file")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be at least 1, --warmup at least 0.")
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as error:
        raise SystemExit(
            f"benchmarks/compare_torch.py needs torch and diffusers: pip install -e '.[compare]' ({error})"
        ) from None

    import jax

    from jaxdit import benchmarking, flops

    if jax.default_backend() != "cpu":
        raise SystemExit(f"benchmarks/compare_torch.py compares CPU steps; jax runs on {jax.default_backend()} here: "
                         "set JAX_PLATFORMS=cpu.")
    config = jaxdit_config(args.preset, args.batch_size or PRESETS[args.preset][3])
    jax_step, setup = jaxdit_stepper(config, count=1 + args.warmup + args.rounds * args.steps)
    torch_step, torch_params = torch_stepper(config)
    # adaLN-Zero predicts zero noise at first, so both first losses are the mean squared noise, about 1.
    first_losses = {"jaxdit_first_loss": jax_step(), "torch_first_loss": torch_step()}
    timed(jax_step, args.warmup)
    timed(torch_step, args.warmup)
    jax_times, torch_times = [], []
    for _ in range(args.rounds):
        jax_times += timed(jax_step, args.steps)
        torch_times += timed(torch_step, args.steps)
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)

    latent_shape = setup["latent_shape"]
    tokens = flops.num_tokens(config.model, latent_shape)
    record = benchmarking.describe("compare_torch", config, jax.device_count(), tokens) | {
        "preset": args.preset,
        "batch_size": config.train.batch_size,
        "tokens_per_sample": tokens,
        "jaxdit_params": setup["params"],
        "torch_params": torch_params,
        "jaxdit_step_s": jax_s,
        "jaxdit_step_min_s": min(jax_times),
        "jaxdit_compile_s": setup["compile_s"],
        "torch_step_s": torch_s,
        "torch_step_min_s": min(torch_times),
        "speedup": torch_s / jax_s,
        **first_losses,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    if args.parts:
        record |= part_figures(config, tokens, count=max(10, args.rounds * args.steps))
    flops_per_sample = flops.train_flops(config.model, latent_shape, 0)
    record |= benchmarking.rate_figures(flops_per_sample, config.train.batch_size / jax_s, jax.device_count())
    return benchmarking.report(record, config_file=f"preset {args.preset}", flags=[], out=args.out)


if __name__ == "__main__":
    main()
