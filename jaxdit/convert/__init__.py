"""Converters from other projects' checkpoints to jaxdit's formats (run as `python -m jaxdit.convert.<name>`)."""

import argparse
import pathlib

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # torch.save files: read with torch, when installed
_MAX_NAMED = 10  # keys named in an error message


def read_tensors(path, *, what: str) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors, .npz or (with torch installed) torch.save file, by key; float32.

    what: what the file should hold, for the error messages (e.g. "a DiT state_dict").
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}: give the path of {what}.")
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path, what)
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                tensors = dict(archive)
        else:
            from safetensors.numpy import load_file  # jax has imported ml_dtypes, so numpy reads bfloat16 too

            tensors = load_file(path)
    except Exception as err:  # safetensors' and numpy's errors for a file that is not theirs
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors or .npz file ({type(err).__name__}: {err}); "
            f"give {what} as .safetensors, .npz or (with torch installed) {'/'.join(TORCH_SUFFIXES)}."
        ) from err
    return {key: np.asarray(value, dtype=np.float32) for key, value in tensors.items()}


def _read_torch(path: pathlib.Path, what: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"reading {path.name} (a torch.save file) needs PyTorch: pip install 'jaxdit[torch]' (the CPU wheel "
            "is enough), or save its tensors as .safetensors or .npz elsewhere and give that file."
        ) from None
    torch.serialization.add_safe_globals([argparse.Namespace])  # DiT's training checkpoints keep their args
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"torch cannot read {str(path)!r} as {what} ({type(err).__name__}: {err}).") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("ema"), dict):  # a training checkpoint: its EMA weights
        loaded = loaded["ema"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{str(path)!r} holds no state_dict of tensors: give {what}.")
    return {key: value.detach().float().numpy() for key, value in loaded.items()}


def some(keys) -> str:
    """A few of `keys`, for an error message."""
    keys = list(keys)
    return ", ".join(keys[:_MAX_NAMED]) + (f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")
