"""A run of a model in Wan 2.1's layout as a diffusers folder that `WanPipeline.from_pretrained` reads.

    python -m jaxdit.export.diffusers runs/wan_ft --out wan_ft-diffusers [--step N] [--dtype bfloat16]
        [--pipeline Wan2.1-T2V-1.3B-Diffusers] [--max-shard-gb 5]

writes the EMA weights of the run's newest checkpoint (or of `--step`) as diffusers' `WanTransformer3DModel` in
DIR/transformer/: its config.json (`transformer_config`, the inverse of `jaxdit.convert.wan.wan_model_config`)
and its state_dict (`state_dict`, the exact inverse of `jaxdit.convert.wan.transformer_params`: torch's (out, in)
Linear weights, the fused qkv and kv split back into to_q, to_k and to_v, the patch embedding as a Conv3d, the
stacked blocks of a scan_layers run one by one) in diffusion_pytorch_model.safetensors, or, larger than
--max-shard-gb, in shards with their index, as `save_pretrained` writes them. A LoRA run's EMA adapters are first
merged into the base weights they adapt (W + alpha/r A B, `jaxdit.lora.merge_adapters`). With the diffusers folder
the weights were imported from (--pipeline; default: the one the run's imported.json records, or that of the run it
started from, if it is still there), its vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json are
copied beside, so that DIR is a whole pipeline:

    pipe = WanPipeline.from_pretrained("wan_ft-diffusers")

Host memory holds the weights once (in --dtype; a LoRA run's in float32, merged before the cast) and the shard
being written; the codec and the text encoder are never loaded. Only a model in Wan 2.1's layout (an import of
jaxdit.convert.wan, fine-tuned or adapted) has diffusers names; any other run is refused.
"""

import argparse
import functools
import json
import operator
import pathlib
import shutil
import sys

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxdit import init_from, lora
from jaxdit.checkpoint import IMPORT_RECORD, Checkpointer
from jaxdit.config import Config, ConfigError
from jaxdit.convert import wan
from jaxdit.export.lora import MODULES
from jaxdit.init_from import weights_target
from jaxdit.model import unstack_blocks
from jaxdit.model_config import WAN_LAYOUT, ModelConfig
from jaxdit.sharding import make_mesh
from jaxdit.train_step import abstract_train_state, model_graphdef

STEM = "diffusion_pytorch_model"  # diffusers' name for a model's weights file
PIPELINE_PARTS = tuple(part for part in wan.PARTS if part != "transformer")  # copied from the source, with PIPELINE_INDEX
PIPELINE_INDEX = "model_index.json"
DEFAULT_SHARD_GB = 5.0  # save_pretrained's max_shard_size="5GB"
GB = 10**9  # as huggingface_hub counts a shard's size
EPS = 1e-6  # the epsilon of jaxdit's norms, Wan 2.1's
ROPE_MAX_SEQ_LEN = 1024  # Wan 2.1's RoPE tables: patches along each axis (jaxdit computes RoPE for any length)
_TORCH_LINEAR = "i o -> o i"  # jaxdit kernel (in, out) -> torch Linear weight (out, in)
# Model fields at the values that give VideoDiT exactly a WanTransformer3DModel's parameters and computation.
WAN_MODEL = {
    **WAN_LAYOUT, "learn_sigma": False, "num_classes": 0, "cross_attention": True, "frame_condition": False,
    "token_mask_ratio": 0.0, "flow_input_scale": False,
}


def check_exportable(config: Config, where: str) -> None:
    """A ConfigError unless `config` is a DiT in Wan 2.1's layout, conditioned on umT5's features, whose weights
    are all a WanTransformer3DModel's (`WAN_MODEL`)."""
    if config.task != "dit":
        raise ConfigError(f"{where} trained a {config.task}, not a DiT: it has no transformer to export.")
    model = config.model
    unlike = [f"model.{name}={getattr(model, name)!r}" for name, value in WAN_MODEL.items() if getattr(model, name) != value]
    if not model.has_text or config.text.encoder != "t5":
        unlike.append(f"text.encoder={config.text.encoder!r} with model.text_dim={model.text_dim}")
    if unlike:
        raise ConfigError(
            f"{where} is not a model in Wan 2.1's layout ({', '.join(unlike)}), so diffusers' WanTransformer3DModel "
            "has no place for its weights; only runs of python -m jaxdit.convert.wan (fine-tuned or adapted) export."
        )


def transformer_config(model: ModelConfig) -> dict:
    """The diffusers `WanTransformer3DModel` config (its config.json) of a model in Wan 2.1's layout: the inverse of
    `jaxdit.convert.wan.wan_model_config`."""
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": list(model.patch),
        "num_attention_heads": model.heads, "attention_head_dim": model.width // model.heads,
        "in_channels": model.in_channels, "out_channels": model.out_channels, "text_dim": model.text_dim,
        "freq_dim": model.frequency_dim, "ffn_dim": model.hidden_width, "num_layers": model.depth,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": EPS, "image_dim": None,
        "added_kv_proj_dim": None, "rope_max_seq_len": ROPE_MAX_SEQ_LEN, "pos_embed_seq_len": None,
    }


def state_dict(dit: dict, model: ModelConfig) -> dict[str, np.ndarray]:
    """VideoDiT's parameters (a pure dict of NumPy arrays, blocks unrolled or stacked) -> Wan's state_dict in torch's
    layout and the arrays' dtype, the exact inverse of `jaxdit.convert.wan.transformer_params`. Every tensor is a
    view of a parameter: nothing is copied until it is written."""
    pt, ph, pw = model.patch
    tensors = {
        "patch_embedding.weight": einops.rearrange(  # (D, C, pt, ph, pw): a Conv3d over patches
            dit["patch_embed"]["kernel"], "(t p q c) d -> d c t p q", t=pt, p=ph, q=pw
        ),
        "patch_embedding.bias": dit["patch_embed"]["bias"],
        "scale_shift_table": dit["final"]["table"][None],  # (1, 2, D)
    }
    for key, path in wan._LAYERS.items():
        tensors.update(_torch_linears((key,), _at(dit, path)))
    for i, block in enumerate(unstack_blocks(dit, model.depth)):
        for path, keys in MODULES.items():  # one diffusers Linear per part of a fused projection
            tensors.update(_torch_linears([f"blocks.{i}.{key}" for key in keys], _at(block, path)))
        tensors.update({f"blocks.{i}.{key}": _at(block, path) for key, path in wan._BLOCK_VECTORS.items()})
        tensors[f"blocks.{i}.scale_shift_table"] = block["table"][None]  # (1, 6, D)
    return tensors


def _at(tree: dict, path: tuple):
    return functools.reduce(operator.getitem, path, tree)


def _torch_linears(keys, layer: dict) -> dict[str, np.ndarray]:
    """A jaxdit Linear, kernel (I, O) and bias (O,) -> the torch weight (O/P, I) and bias (O/P,) of each of the P
    layers named by `keys` that it fuses along its output axis, in order (one key: the layer itself)."""
    kernels, biases = np.split(layer["kernel"], len(keys), axis=1), np.split(layer["bias"], len(keys))  # P x (I, O/P), (O/P,)
    tensors = {}
    for key, kernel, bias in zip(keys, kernels, biases, strict=True):
        tensors[f"{key}.weight"], tensors[f"{key}.bias"] = einops.rearrange(kernel, _TORCH_LINEAR), bias
    return tensors


def shard_plan(tensors: dict[str, np.ndarray], itemsize: int, max_bytes: int) -> list[list[str]]:
    """The keys of `tensors`, in order, grouped into shards of at most `max_bytes` (a larger tensor alone in one)."""
    shards, size = [[]], 0
    for key, tensor in tensors.items():
        nbytes = tensor.size * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_weights(tensors: dict[str, np.ndarray], directory: pathlib.Path, *, dtype: str, max_shard_gb: float,
                  metadata: dict[str, str]) -> list[str]:
    """`tensors` cast to `dtype` -> STEM.safetensors in `directory`, or, larger than `max_shard_gb`, the shards
    STEM-0000i-of-0000n.safetensors and their index, written one at a time; returns the files' names."""
    itemsize = jnp.dtype(dtype).itemsize
    plan = shard_plan(tensors, itemsize, int(max_shard_gb * GB))
    count = len(plan)
    names = [f"{STEM}.safetensors"] if count == 1 else [f"{STEM}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for name, keys in zip(names, plan, strict=True):  # one shard's copies in memory at a time
        shard = {key: np.ascontiguousarray(tensors[key], dtype=jnp.dtype(dtype)) for key in keys}
        save_file(shard, directory / name, metadata={"format": "pt", **metadata})
    if count > 1:
        index = {"metadata": {"total_size": sum(t.size for t in tensors.values()) * itemsize},
                 "weight_map": {key: name for name, keys in zip(names, plan, strict=True) for key in keys}}
        (directory / f"{STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def read_weights(run: pathlib.Path, *, step: int | None = None, dtype: str = "float32") -> tuple[int, Config, dict]:
    """(step, config, VideoDiT parameters as a pure dict of NumPy arrays in host memory) of `run`'s checkpoint `step`
    (default: the newest that reads): its EMA weights in `dtype`, or a LoRA run's EMA adapters merged into its base
    weights, in float32."""
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoints in {str(run)!r} (looked for {str(checkpoints)!r}): give a run folder "
                                "of python -m jaxdit.convert.wan, or of a fine-tune of it.")
    mesh = make_mesh(devices=jax.local_devices(backend="cpu")[:1])  # host memory: the weights go to files
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        read = functools.partial(_read_step, checkpointer, where=repr(str(run)), mesh=mesh, dtype=dtype)
        step, (config, state) = checkpointer.newest_readable(read, step=step)
    params = _merged(config, run, mesh, state) if config.train.lora_rank else state["ema"]
    return step, config, jax.tree.map(np.asarray, nnx.to_pure_dict(params)["dit"])  # views of the host arrays


def _read_step(checkpointer: Checkpointer, step: int, *, where: str, mesh, dtype: str) -> tuple[Config, dict]:
    config = Config.from_dict(checkpointer.restore_config(step))
    check_exportable(config, where)
    stored = "float32" if config.train.lora_rank else dtype  # adapters are merged before the cast
    return config, checkpointer.restore_weights(weights_target(abstract_train_state(config, mesh), stored), step=step)


def _merged(config: Config, run: pathlib.Path, mesh, state: dict) -> nnx.State:
    """A LoRA run's EMA adapters folded into the base weights it adapts (`init_from.recorded_source`)."""
    base = init_from.base_params(config, init_from.recorded_source(run), mesh)
    return lora.merged_params(model_graphdef(config), base, state["ema"], state["model_rngs"])


def recorded_pipeline(run) -> pathlib.Path | None:
    """The diffusers folder `run`'s weights were imported from: the source its imported.json records, or that of
    the run it started from (its init_from.json, followed back to the import); None when none is recorded."""
    run, seen = pathlib.Path(run).absolute(), set()
    while run not in seen:
        seen.add(run)
        if (run / IMPORT_RECORD).is_file():
            return pathlib.Path(json.loads((run / IMPORT_RECORD).read_text())["source"])
        if not (run / init_from.RECORD).is_file():
            return None
        start = json.loads((run / init_from.RECORD).read_text())
        if start.get("imported"):
            return pathlib.Path(start["imported"]["source"])
        run = pathlib.Path(start["init_from"]).absolute()
    return None


def export(run, out, *, step: int | None = None, dtype: str = "float32", pipeline=None,
           max_shard_gb: float = DEFAULT_SHARD_GB) -> pathlib.Path:
    """Writes the EMA weights of `run`'s checkpoint `step` (default: the newest) as diffusers' Wan transformer in
    out/transformer and, given `pipeline` (a diffusers Wan 2.1 T2V folder), that folder's other parts beside it;
    returns `out`. The run, the pipeline folder and `out` (new, or empty) are checked before anything is written."""
    run, out = pathlib.Path(run), pathlib.Path(out)
    if dtype not in wan.DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(wan.DTYPES)}, got {dtype!r}.")
    if not max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be positive, got {max_shard_gb}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} is not empty; give a new --out directory.")
    source = None if pipeline is None else wan.check_pipeline_folder(pipeline)
    step, config, dit = read_weights(run, step=step, dtype=dtype)
    if source is not None:
        wan._check_parts_fit(source, config.model)
    tensors = state_dict(dit, config.model)
    wan.check_tensors(tensors, config.model)  # every key of the model's Wan state_dict, each in its shape
    transformer = out / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(json.dumps(transformer_config(config.model), indent=2) + "\n")
    write_weights(tensors, transformer, dtype=dtype, max_shard_gb=max_shard_gb,
                  metadata={"jaxdit_run": str(run.absolute()), "step": str(step)})
    if source is not None:
        for part in PIPELINE_PARTS:
            shutil.copytree(source / part, out / part)
        shutil.copyfile(source / PIPELINE_INDEX, out / PIPELINE_INDEX)
    return out


def pipeline_source(run, given=None) -> tuple[pathlib.Path | None, str]:
    """The pipeline folder to copy (the one given, or the recorded one if it is still there), and a note when none."""
    if given is not None:
        return pathlib.Path(given), ""
    recorded = recorded_pipeline(run)
    if recorded is not None and recorded.is_dir():
        return recorded, ""
    why = "records no diffusers folder it came from" if recorded is None else f"came from {str(recorded)!r}, which is gone"
    return None, (f"note: {run} {why}, so only transformer/ is written; give --pipeline SRC (the Wan 2.1 diffusers "
                  "folder) for a whole WanPipeline folder.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.export.diffusers",
        description="a run of a model in Wan 2.1's layout -> a diffusers folder (WanPipeline.from_pretrained)",
        epilog="a LoRA run exports with its adapters merged; python -m jaxdit.export.lora writes them alone",
    )
    parser.add_argument("run", help="the run's folder: a jaxdit.convert.wan import, or a fine-tune or LoRA run of one")
    parser.add_argument("--out", required=True, help="the diffusers folder to write (new, or empty)")
    parser.add_argument("--step", type=int, help="the checkpoint step to export (default: the newest)")
    parser.add_argument("--dtype", choices=wan.DTYPES, default="float32", help="the stored weights (default: %(default)s)")
    parser.add_argument("--pipeline", help="the diffusers Wan 2.1 folder whose vae/, text_encoder/, tokenizer/ and "
                                           "scheduler/ to copy (default: the one the run was imported from)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_GB,
                        help="the largest weights file; more weights are sharded (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        pipeline, note = pipeline_source(args.run, args.pipeline)
        out = export(args.run, args.out, step=args.step, dtype=args.dtype, pipeline=pipeline,
                     max_shard_gb=args.max_shard_gb)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"error: {error}")
    if note:
        print(note)
    load = f"WanPipeline.from_pretrained({str(out)!r})" if pipeline else \
        f"WanTransformer3DModel.from_pretrained({str(out / 'transformer')!r})"
    print(f"wrote {args.run} as a diffusers folder to {out}; in diffusers: {load}")


if __name__ == "__main__":
    main()
