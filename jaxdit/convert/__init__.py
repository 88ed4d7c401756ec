"""Converters from other projects' checkpoints to jaxdit's formats (run as `python -m jaxdit.convert.<name>`)."""

import argparse
import collections.abc
import json
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


class SafetensorsFolder(collections.abc.Mapping):
    """The tensors of a model folder's safetensors, read one at a time when asked for: `STEM.safetensors`, or
    the shards an index `STEM.safetensors.index.json` names (as diffusers and transformers save large models).

    Only the files' headers are read up front: `shapes` and `dtypes` by key, every shard checked to be
    present and to hold the keys the index gives it. `folder[key]` then reads that one tensor, cast to
    `dtype` when given (else as stored), so a model of any size is converted tensor by tensor.
    """

    def __init__(self, folder, stem: str, *, dtype=None, what: str = "the model"):
        from safetensors import safe_open  # jax has imported ml_dtypes, so numpy holds bfloat16 too

        folder, self.dtype = pathlib.Path(folder), dtype
        index, single = folder / f"{stem}.safetensors.index.json", folder / f"{stem}.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{str(folder)!r} holds neither {single.name} nor {index.name}: give {what}'s folder.")
        names = sorted(set(weight_map.values())) if weight_map else [single.name]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names {len(names)} files but {some(missing)} is not in "
                                    f"{str(folder)!r}: copy every shard.")
        self.files, self.shapes, self.dtypes = {}, {}, {}
        for name in names:
            try:
                with safe_open(folder / name, framework="numpy") as file:
                    for key in file.keys():
                        if key in self.files:
                            raise ValueError(f"{key} is in both {self.files[key].name} and {name}: the shards are "
                                             "of different saves.")
                        header = file.get_slice(key)
                        self.files[key], self.shapes[key] = folder / name, tuple(header.get_shape())
                        self.dtypes[key] = header.get_dtype()
            except ValueError:
                raise
            except Exception as err:  # safetensors' errors for a file that is not one
                raise ValueError(f"{str(folder / name)!r} is not a readable safetensors file ({type(err).__name__}: "
                                 f"{err}); download it again.") from err
        strays = sorted(key for key, name in (weight_map or {}).items() if self.files.get(key, folder / name).name != name)
        if strays:
            raise ValueError(f"{str(index)!r} puts {len(strays)} tensors in files that do not hold them: {some(strays)}; "
                             "the shards and the index are of different saves.")

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.files[key], framework="numpy") as file:  # closed at once: no file stays mapped
            tensor = file.get_tensor(key)
        return tensor if self.dtype is None else tensor.astype(self.dtype, copy=False)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def nbytes(self, dtype=None) -> int:
        """The tensors' size in bytes, as stored or in `dtype`."""
        sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}
        return sum(int(np.prod(shape)) * (np.dtype(dtype).itemsize if dtype else sizes[self.dtypes[key]])
                   for key, shape in self.shapes.items())
