"""Cuts a transformers T5 / umT5 / mT5 checkpoint down to the frozen text encoder a jaxdit run reads.

    python -m jaxdit.convert.t5 /models/t5-v1_1-xxl --out /models/t5-v1_1-xxl-encoder-bf16 --dtype bfloat16
    python train.py --config configs/shapes_t5.py --text.path /models/t5-v1_1-xxl-encoder-bf16

SRC is a folder as transformers' `save_pretrained` writes it, of any architecture `jaxdit.t5` reads
(`T5ForConditionalGeneration` included: 11B parameters of which the encoder is 4.7B). Every tensor
the encoder needs is checked against what SRC's config.json describes first; a missing, unexpected
or mis-shaped one is named and nothing is written. OUT is again a transformers folder, of the
encoder alone: config.json naming the `...EncoderModel`, the encoder's tensors under their own key
names in `--dtype` (one model.safetensors, or shards of at most `--shard-gb` with an index), the
tokenizer files, and `converted.json` saying what it came from. So `text.path`, transformers'
`T5EncoderModel.from_pretrained` and this command read it alike. A diffusers pipeline keeps its
tokenizer in a folder of its own: give it with `--tokenizer`, e.g.
`python -m jaxdit.convert.t5 Wan2.1-T2V-1.3B-Diffusers/text_encoder --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer --out DIR`.
"""

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np

from jaxdit import t5

ENCODER_ARCHITECTURES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}  # by model_type
DTYPES = ("float32", "bfloat16", "float16")
RECORD = "converted.json"
_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")  # copied when present


def _shards(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    """Tensors in key order, cut into groups of at most `limit` bytes (a larger tensor gets a group of its own)."""
    groups, size = [{}], 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][key] = tensors[key]
        size += nbytes
    return groups


def convert(src, out, *, dtype: str = "bfloat16", shard_bytes: int = 5 << 30, tokenizer=None) -> pathlib.Path:
    """Writes the encoder of the checkpoint folder `src` into `out` (see the module docstring); returns `out`.

    tokenizer: the folder of the tokenizer files, when it is not `src` (a diffusers pipeline's tokenizer/).
    """
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    src, out = t5.check_folder(src, tokenizer=tokenizer), pathlib.Path(out)
    tokenizer = src if tokenizer is None else pathlib.Path(tokenizer)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {str(out)!r} is the source folder: write the encoder somewhere else.")
    spec = t5.T5Spec.from_folder(src, tokenizer=tokenizer)
    t5.T5Tokenizer(src, max_length=8, spec=spec, tokenizer=tokenizer)  # the tokenizer reads and fits the embedding
    tensors = t5.read_weights(src)
    t5.convert(tensors, nnx.eval_shape(lambda: t5.T5Encoder(spec, rngs=nnx.Rngs(0))))  # names what does not fit
    if "shared.weight" not in tensors:  # the encoder's own copy of the tied embedding, under transformers' main name
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    tensors.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight: transformers saves one
    for key, value in tensors.items():  # in place: no second copy of an encoder already in `dtype`
        tensors[key] = np.ascontiguousarray(value.astype(jnp.dtype(dtype), copy=False))

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / t5.INDEX_FILE]:  # from an earlier conversion into out
        stale.unlink(missing_ok=True)
    groups = _shards(tensors, shard_bytes)
    if len(groups) == 1:
        save_file(groups[0], out / t5.WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, out / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(group, name)
        total = sum(value.nbytes for value in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / t5.INDEX_FILE).write_text(json.dumps(index, indent=2))

    config = json.loads((src / t5.CONFIG_FILE).read_text())
    # By model_type, as jaxdit.t5 reads it: hub umT5 configs name T5ForConditionalGeneration.
    config |= {"architectures": [ENCODER_ARCHITECTURES[config["model_type"]]], "torch_dtype": dtype, "dtype": dtype}
    (out / t5.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for name in (*t5.TOKENIZER_FILES, *_TOKENIZER_EXTRAS):
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    record = {"source": str(src.absolute()), "source_architecture": spec.architecture, "dtype": dtype,
              "source_sha256": t5.digests(src, tokenizer=tokenizer)["weights"], "parameters": int(sum(v.size for v in tensors.values()))}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.convert.t5", description="transformers T5 / umT5 folder -> its frozen text encoder alone"
    )
    parser.add_argument("src", help="a transformers checkpoint folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="the encoder folder to write (give it as text.path)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the stored weights (%(default)s)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest weight file, in GB (%(default)s)")
    parser.add_argument("--tokenizer", help="the folder of the tokenizer files when it is not SRC (a diffusers "
                                            "pipeline's tokenizer/ beside its text_encoder/)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, dtype=args.dtype, shard_bytes=int(args.shard_gb * 2**30),
                      tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    record = json.loads((out / RECORD).read_text())
    print(f"wrote the {record['source_architecture']} encoder ({record['parameters']:,} parameters, {args.dtype}) "
          f"to {out}; train with --text.encoder t5 --text.path {out}")


if __name__ == "__main__":
    main()
