"""A LoRA run's adapters as a safetensors file that diffusers' `WanPipeline.load_lora_weights` reads.

    python -m jaxdit.export.lora runs/wan_lora --out wan_lora.safetensors [--step N]

writes the EMA adapters of the run's newest checkpoint (or of `--step`), the weights sample.py samples from,
under the names of diffusers' Wan transformer, in PEFT's layout: for block i and each adapted projection,
`transformer.blocks.{i}.{module}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), with the run's
lora_alpha / r folded into lora_B (diffusers then applies the pair at scale 1). jaxdit's fused projections
export as the separate ones they fuse: self-attention's qkv as attn1.to_q, to_k and to_v, cross-attention's kv
as attn2.to_k and to_v, each with its own part of the adapter (`jaxdit.lora`), so the product is exact. In
diffusers:

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    pipe.load_lora_weights("wan_lora.safetensors")

Only a model in Wan 2.1's layout (an import of jaxdit.convert.wan, fine-tuned) has diffusers names.
"""

import argparse
import pathlib
import sys

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxdit import lora
from jaxdit.checkpoint import Checkpointer, CheckpointError
from jaxdit.config import Config, ConfigError
from jaxdit.convert.wan import _BLOCK_LAYERS, _FUSED
from jaxdit.model import unstack_blocks
from jaxdit.model_config import WAN_LAYOUT
from jaxdit.options import LORA_TARGETS
from jaxdit.sharding import make_mesh
from jaxdit.train_step import abstract_train_state

PREFIX = "transformer"  # diffusers' component, ahead of the transformer's own module names
# jaxdit projection (sublayer, name) -> the diffusers modules it holds, in the order of its parts.
MODULES = {**{path: (module,) for module, path in _BLOCK_LAYERS.items()}, **_FUSED}


def check_exportable(config: Config, where: str) -> None:
    """A ConfigError unless `config` is a LoRA run of a model in Wan 2.1's layout."""
    if not config.train.lora_rank:
        raise ConfigError(f"{where} is not a LoRA run (train.lora_rank=0): it has no adapters to export.")
    unlike = [f"model.{name}={getattr(config.model, name)!r}" for name, value in WAN_LAYOUT.items()
              if getattr(config.model, name) != value]
    if unlike:
        raise ConfigError(
            f"{where} adapts a model that is not in Wan 2.1's layout ({', '.join(unlike)}), so its layers have no "
            "diffusers names; only runs fine-tuned from python -m jaxdit.convert.wan export for diffusers."
        )


def adapter_tensors(config: Config, adapters) -> dict[str, np.ndarray]:
    """The adapters of a LoRA run's VideoDiT (the `dit` part of its params or EMA: nnx.State or pure dict) ->
    {diffusers key: float32 array}, blocks in order, each projection's lora_A (r, in) and lora_B (out, r)."""
    dit = nnx.to_pure_dict(adapters) if isinstance(adapters, nnx.State) else adapters
    dit = dit.get("dit", dit)
    blocks = unstack_blocks(jax.tree.map(np.asarray, dit), config.model.depth)
    scale, rank = lora.scale(config.train), config.train.lora_rank
    tensors = {}
    for i, block in enumerate(blocks):
        for sublayer, names in LORA_TARGETS.items():
            for name in names:
                adapter = block.get(sublayer, {}).get(name, {}).get("lora")
                if adapter is None:
                    continue
                down, up = np.asarray(adapter["down"], np.float32), np.asarray(adapter["up"], np.float32)  # (I, P R), (P, R, O/P)
                for part, module in enumerate(MODULES[(sublayer, name)]):
                    key = f"{PREFIX}.blocks.{i}.{module}"
                    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(down[:, part * rank:(part + 1) * rank].T)  # (R, I)
                    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray((up[part] * np.float32(scale)).T)  # (O/P, R)
    return tensors


def export(run, out, *, step: int | None = None) -> pathlib.Path:
    """Writes the EMA adapters of `run`'s checkpoint `step` (default: the newest) to the safetensors file `out`."""
    run, out = pathlib.Path(run), pathlib.Path(out)
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoints in {str(run)!r} (looked for {str(checkpoints)!r}): give a LoRA run's folder.")
    mesh = make_mesh(devices=jax.local_devices()[:1])
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{str(checkpoints)!r} holds no complete checkpoint; train the run first.")

        def read(step):
            config = Config.from_dict(checkpointer.restore_config(step))
            check_exportable(config, repr(str(run)))
            return config, checkpointer.restore_weights(abstract_train_state(config, mesh), step=step)["ema"]

        step, (config, adapters) = checkpointer.newest_readable(read, step=step)
    tensors = adapter_tensors(config, adapters)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "jaxdit_run": str(run.absolute()), "step": str(step),
                "lora_rank": str(config.train.lora_rank), "scale_folded_into_lora_B": str(lora.scale(config.train))}
    save_file(tensors, out, metadata=metadata)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.export.lora",
        description="a LoRA run's EMA adapters -> a safetensors file for diffusers' WanPipeline.load_lora_weights",
    )
    parser.add_argument("run", help="the LoRA run's folder (train.py --workdir, trained with --train.lora_rank R)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--step", type=int, help="the checkpoint step to export (default: the newest)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.out, step=args.step)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote the adapters of {args.run} to {out}; in diffusers: pipe.load_lora_weights({str(out)!r})")


if __name__ == "__main__":
    main()
