"""Host memory of converting a Wan transformer (`jaxdit.convert.wan`): peak RSS against the weights' bf16 size.

    python benchmarks/convert_wan_memory.py                 # Wan 1.3B's width, 8 blocks, float32 shards -> bfloat16
    python benchmarks/convert_wan_memory.py --blocks 30     # the whole 1.3B (5.7 GB of float32 shards on disk)

Writes a random float32 diffusers transformer of Wan 2.1 1.3B's width (1536, 12 heads, FFN 8960, umT5 features
4096) with `--blocks` blocks into a temporary folder as diffusers shards it (files of at most `--shard-gb`, an
index), then converts it to a step-0 checkpoint in a fresh process (`save_transformer`: tensors read one at a
time, cast to --dtype, written by orbax and read back by jaxdit's Checkpointer), and prints that process's peak
resident memory beside its memory before the conversion (Python, jax and jaxdit imported). The conversion's own
memory is the difference; the 14B model's is its size in bf16 times the same ratio, as nothing is held per
block. The umT5 and VAE conversions are not measured here.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile

import numpy as np

WIDTH, HEADS, FFN, TEXT, FREQ, CHANNELS = 1536, 12, 8960, 4096, 256, 16


def write_transformer(folder: pathlib.Path, blocks: int, shard_bytes: int) -> int:
    """A random Wan transformer as diffusers' shards; returns its parameter count."""
    from safetensors.numpy import save_file

    from jaxdit.convert.wan import expected_shapes, wan_model_config

    config = dict(patch_size=[1, 2, 2], num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS,
                  in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT, freq_dim=FREQ, ffn_dim=FFN,
                  num_layers=blocks, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = expected_shapes(wan_model_config(config))
    rng, groups, size = np.random.default_rng(0), [[]], 0
    for key in sorted(shapes):
        nbytes = 4 * int(np.prod(shapes[key]))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map = {}
    for k, keys in enumerate(groups, start=1):
        name = f"diffusion_pytorch_model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({key: rng.standard_normal(shapes[key], dtype=np.float32) * 0.02 for key in keys}, folder / name)
        weight_map |= dict.fromkeys(keys, name)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(int(np.prod(shape)) for shape in shapes.values())


def convert(folder: str, out: str, dtype: str) -> None:
    """In the measured process: convert, then print the peak and the memory before, in bytes."""
    from jaxdit.config import Config, TextConfig
    from jaxdit.convert import SafetensorsFolder
    from jaxdit.convert.wan import save_transformer, wan_model_config

    before = _rss_now()
    tensors = SafetensorsFolder(folder, "diffusion_pytorch_model", dtype=dtype)
    model = wan_model_config(json.loads((pathlib.Path(folder) / "config.json").read_text()))
    config = Config(model=model, text=TextConfig(encoder="t5"))  # umT5 is frozen: the denoiser is the DiT alone
    save_transformer(tensors, config, pathlib.Path(out))
    print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _rss_now() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shard-gb", type=float, default=0.5)
    parser.add_argument("--convert", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:
        return convert(*args.convert, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "transformer"
        params = write_transformer(folder, args.blocks, int(args.shard_gb * 2**30))
        out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--convert", str(folder),
                              str(pathlib.Path(tmp) / "checkpoints")], check=True, capture_output=True, text=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    gib, bf16 = 2**30, 2 * params
    used = measured["peak"] - measured["before"]
    print(f"Wan transformer, width {WIDTH}, {args.blocks} blocks: {params:,} parameters; float32 shards of "
          f"{args.shard_gb} GiB -> {args.dtype}")
    print(f"  size in bf16            {bf16 / gib:6.2f} GiB")
    print(f"  memory before           {measured['before'] / gib:6.2f} GiB (Python, jax, jaxdit)")
    print(f"  peak                    {measured['peak'] / gib:6.2f} GiB")
    print(f"  conversion (peak - before) {used / gib:6.2f} GiB = {used / bf16:.2f}x the bf16 size")


if __name__ == "__main__":
    main()
