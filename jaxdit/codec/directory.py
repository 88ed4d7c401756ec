"""Codec directories: a frozen codec on disk, and what a run records of it.

    DIR/codec.json     {"kind": ..., "spec": {...}, ...}: what to build (kind, keyword arguments), and notes
                       such as how the latent scale was measured
    DIR/params/        its parameters (orbax), absent for a codec without any

`save` writes one; `jaxdit.codec.load` builds the codec back from it. Nothing here builds a codec
or reads data, so a latent cache's reader can check which codec encoded it without a cycle.
"""

import json
import pathlib

from flax import nnx

SPEC_FILE, PARAMS_DIR = "codec.json", "params"
RUN_CODEC_DIR = "codec"  # a codec-training run writes its frozen codec into workdir/codec/
RUN_RECORD = "frozen_codec.json"  # a DiT run's copy of the codec.json of the saved codec it trains on
# Spec entries that change how a codec computes, not the latents it makes, so a run does not compare them:
# the Wan VAE's latent frames per decoded chunk.
RUNTIME_SPEC = ("decode_chunk",)


def save(codec, directory, **notes) -> pathlib.Path:
    """Writes `codec` (structure, parameters, scale) as a codec directory; `notes` go into codec.json."""
    import jax
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.state(codec, nnx.Param)
    if jax.tree.leaves(params):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(params), force=True)
    if jax.process_index() == 0:  # every process saves the parameters with orbax; one writes the JSON
        spec = {"kind": codec.kind, "spec": codec.spec(), **notes}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def codec_directory(path) -> pathlib.Path:
    """The codec directory at `path`, or in `path/codec/` (a codec-training run), or a FileNotFoundError."""
    path = pathlib.Path(path)
    for candidate in (path, path / RUN_CODEC_DIR):
        if (candidate / SPEC_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no codec in {str(path)!r} (no {SPEC_FILE} there or in {RUN_CODEC_DIR}/): give a directory written by "
        "a codec training run (train.py with a codec config) or by `python -m jaxdit.convert.sd_vae`."
    )


def describe(path) -> dict:
    """The codec.json of the codec directory at `path`."""
    return json.loads((codec_directory(path) / SPEC_FILE).read_text())


def _latents_defining(description: dict) -> dict:
    spec = {k: v for k, v in description.get("spec", {}).items() if k not in RUNTIME_SPEC}
    return {**description, "spec": spec} if "spec" in description else description


def check_unchanged(path, recorded: dict, user: str) -> None:
    """A ValueError when the codec at `path` is no longer the one `user` recorded (its codec.json, less
    RUNTIME_SPEC)."""
    current, recorded = _latents_defining(describe(path)), _latents_defining(recorded)
    if current != recorded:
        changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
        details = ", ".join(f"{k}: {recorded.get(k)!r} then, {current.get(k)!r} now" for k in changed)
        raise ValueError(
            f"the codec at {str(path)!r} changed since {user} used it ({details}). Latents of another codec "
            "mean nothing to this model: restore that codec, or train the DiT again on the new one."
        )
