"""Wan 2.1's transformer in jaxdit against diffusers' WanTransformer3DModel in PyTorch, side by side in one
run on CPU: a forward pass, and sampling with UniPC and guidance; seconds and their ratio.

    pip install -e '.[compare]'                     # torch and diffusers, for this benchmark only
    python benchmarks/compare_wan.py                # the 1.3B model's width (1536, 12 heads, MLP 8960), 2 blocks
    python benchmarks/compare_wan.py --layers 4 --frames 5 --height 32 --width 48 --steps 20 --rounds 3

Both sides run the same weights: a random diffusers model (float32) whose state_dict jaxdit maps with
`jaxdit.convert.wan.transformer_params`, on the same random latents (B, C=16, T, H, W), timestep and
512 umT5-wide text tokens (4096 features). Both hold their weights and inputs where they compute, before
anything is timed: jaxdit's as device arrays (as `Pipeline.load` puts them), PyTorch's as its tensors.
The forward pass: jaxdit's jitted VideoDiT, compiled with jaxdit's CPU compiler options
(`jaxdit.host.compiler_options`, as its pipeline's sampler), PyTorch's module under `torch.no_grad()`,
eagerly as diffusers runs it. Sampling: `--steps` UniPC steps with guidance 5 against a second caption
(a negative prompt), cond and uncond in one batch of 2 on both sides: diffusers'
`UniPCMultistepScheduler` as Wan configures it and a Python loop over the transformer, against
jaxdit's `sample_flow(sampler="unipc")`, one jitted scan. The two results are compared (largest
difference over largest value) before anything is timed. After a warm-up, the sides are timed in
alternating rounds and the median of each is printed, with `speedup` = PyTorch's median / jaxdit's
(above 1: jaxdit is faster). Figures are printed, never asserted.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdit import host
from jaxdit.convert.wan import transformer_params, wan_model_config
from jaxdit.model import VideoDiT
from jaxdit.sampling import guide, sample_flow

TEXT_TOKENS, TEXT_DIM, CHANNELS, SHIFT, CFG = 512, 4096, 16, 3.0, 5.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (the 1.3B model has 30)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--height", type=int, default=16, help="latent height (pixels / 8)")
    parser.add_argument("--width", type=int, default=24, help="latent width")
    parser.add_argument("--steps", type=int, default=20, help="UniPC steps of the sampling comparison")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Prints the figures; returns them: {what: difference, or {"jaxdit": s, "pytorch": s, "speedup": x}}."""
    args = parse_args(argv)
    figures = {}
    import torch
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=CHANNELS,
        out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=8960, num_layers=args.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    torch_model = WanTransformer3DModel(**config).eval()
    model_config = wan_model_config(config)
    model = VideoDiT(model_config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    # Device arrays: numpy leaves (the converter's transposed views) would be copied to the device, and
    # transposed, in every call of the jitted function.
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, transformer_params(tensors, model_config)))
    nnx.update(model, params)
    graphdef, state = nnx.split(model)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, CHANNELS, args.frames, args.height, args.width), dtype=np.float32)
    text = rng.standard_normal((2, TEXT_TOKENS, TEXT_DIM), dtype=np.float32)  # the prompt, the negative prompt
    x_torch, text_torch = torch.from_numpy(latents), torch.from_numpy(text)
    x_jax = jnp.asarray(latents.transpose(0, 2, 3, 4, 1))  # channels-last
    t_jax, t_torch = jnp.asarray([500.0]), torch.tensor([500.0])
    text_jax, prompt_jax, prompt_torch = jnp.asarray(text), jnp.asarray(text[:1]), text_torch[:1]
    tokens = args.frames * args.height * args.width // 4
    print(f"Wan transformer, width 1536, {args.layers} blocks, {tokens} video tokens, {TEXT_TOKENS} text tokens; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} on {jax.devices()[0]}")

    # The forward pass.
    options = host.compiler_options(jax.default_backend())
    forward_jax = jax.jit(lambda state, x, t, text: nnx.merge(graphdef, state)(x, t, text=text),
                          compiler_options=options)

    def run_jax():
        return forward_jax(state, x_jax, t_jax, prompt_jax).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return torch_model(x_torch, t_torch, prompt_torch, return_dict=False)[0]

    figures["forward_difference"] = _agree("forward", np.asarray(run_jax()), run_torch().numpy().transpose(0, 2, 3, 4, 1))
    figures["forward"] = _race("forward", run_jax, run_torch, args.rounds)

    # Sampling: UniPC with guidance against the negative prompt, [cond; uncond] in one batch.
    sample_jax = jax.jit(lambda state, x, text: sample_flow(
        guide(lambda x2, t2: nnx.merge(graphdef, state)(x2, t2, text=text), CFG, CHANNELS),
        jax.random.split(jax.random.key(0), 1), x.shape[1:], steps=args.steps, sampler="unipc", prediction="v",
        shift=SHIFT, x_T=x,
    ), compiler_options=options)

    def run_sample_jax():
        return sample_jax(state, x_jax, text_jax).block_until_ready()

    def run_sample_torch():
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                            num_train_timesteps=1000)
        scheduler.set_timesteps(args.steps)
        x = x_torch.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = torch_model(torch.cat([x, x]), t.expand(2).float(), text_torch, return_dict=False)[0]
                cond, uncond = out.chunk(2)
                x = scheduler.step(uncond + CFG * (cond - uncond), t, x, return_dict=False)[0]
        return x

    figures["sampling_difference"] = _agree(
        "sampling", np.asarray(run_sample_jax()), run_sample_torch().numpy().transpose(0, 2, 3, 4, 1)
    )
    figures["sampling"] = _race(f"{args.steps}-step UniPC sampling, guidance {CFG:g}", run_sample_jax,
                                run_sample_torch, args.rounds)
    return figures


def _agree(what: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    difference = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"{what}: largest difference / largest value {difference:.2e}")
    return difference


def _race(what: str, run_jax, run_torch, rounds: int) -> dict:
    times = {"jaxdit": [], "pytorch": []}
    run_jax(), run_torch()  # warm-up (jaxdit compiled above)
    for _ in range(rounds):
        for name, run in (("jaxdit", run_jax), ("pytorch", run_torch)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    jaxdit, pytorch = statistics.median(times["jaxdit"]), statistics.median(times["pytorch"])
    print(f"{what}: jaxdit {jaxdit:.3f} s, pytorch {pytorch:.3f} s (medians of {rounds}), speedup {pytorch / jaxdit:.2f}")
    return {"jaxdit": jaxdit, "pytorch": pytorch, "speedup": pytorch / jaxdit}


if __name__ == "__main__":
    main()
