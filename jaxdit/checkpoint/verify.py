"""Whether a checkpoint reads completely, and why not.

A committed checkpoint can still be damaged afterwards: a disk that fills or fails, a folder copied or
synced part-way, a file cut short by a quota. `read_problem` reads everything a resume needs: the
state's metadata, then every array of the state (one part of the state at a time: the parameters,
the EMA, the optimizer's moments), the config and each process's data-iterator position, and names
the first thing that fails.
"""

import json
import logging
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.orbax_reads import first_line, quiet_failed_reads

STATE, DATA, CONFIG = "state", "data", "config"  # the items of one checkpoint
IMPORT_RECORD = "imported.json"  # in a run directory of imported weights (jaxdit.convert): their source
IMPORTED_PARTS = ("ema", "model_rngs")  # what an import's checkpoint holds: weights for sampling, no optimizer
READ_BYTES = 1 << 30  # arrays read back at once: a checkpoint of any size is checked in pieces of this size


class _NoStepMetadataNote(logging.Filter):
    """Drops orbax's note that an item folder (checkpoints/STEP/state) has no step metadata: it is read
    directly here and when sampling, where the step's metadata is one folder up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_NoStepMetadataNote())


def read_problem(step_dir, *, check_shapes: bool = True) -> str | None:
    """None when the checkpoint in `step_dir` (e.g. checkpoints/12000) reads completely, else the first
    file or array that does not, and why, in one line. `check_shapes`: also compare each array's shape
    with the model its saved config describes (not needed right after a save of that very state)."""
    step_dir = pathlib.Path(step_dir).absolute()
    if not (step_dir / STATE).is_dir():
        return f"{STATE}/ is missing from {step_dir}"
    try:
        metadata = _reader().metadata(step_dir / STATE).item_metadata
    except Exception as error:  # a corrupt array_metadatas or manifest
        return f"{STATE}/ metadata does not read: {first_line(error)}"
    if metadata is None:  # orbax's reader returns none for a _METADATA that is missing or not JSON
        return f"{STATE}/_METADATA is missing or not JSON"
    tree = metadata.tree
    problem = _shape_problem(step_dir, tree) if check_shapes else None
    if problem:
        return problem
    for key, part in tree.items():
        for item in _pieces({key: part}):
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            try:
                with _reader() as reader, quiet_failed_reads():
                    reader.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(item, args, partial_restore=True))
            except Exception as error:  # a truncated or missing array file: tensorstore names the array
                return f"{STATE}/{key}: {first_line(error)}"
    return _json_problem(step_dir / CONFIG / "metadata") or _data_problem(step_dir / DATA)


def _pieces(tree: dict) -> list[dict]:
    """A nested dict of array metadata cut into nested dicts of at most READ_BYTES of arrays each (a larger
    array alone), so that reading a checkpoint back holds one piece at a time, not a whole model."""
    pieces, size = [{}], 0
    for path, leaf in flatten_dict(tree, keep_empty_nodes=True).items():
        nbytes = int(np.prod(getattr(leaf, "shape", ()) or (1,))) * np.dtype(getattr(leaf, "dtype", None) or np.float32).itemsize
        if pieces[-1] and size + nbytes > READ_BYTES:
            pieces.append({})
            size = 0
        pieces[-1][path] = leaf
        size += nbytes
    return [unflatten_dict(piece) for piece in pieces]


def _reader() -> ocp.Checkpointer:
    """An orbax reader for this process alone: no barriers with the others, which are not reading."""
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone)


def _shape_problem(step_dir: pathlib.Path, tree) -> str | None:
    """The first array whose stored shape is not the one the checkpoint's own config gives (the arrays
    of another model copied in), or None; also None for a checkpoint without a jaxdit config."""
    from jaxdit.config import Config
    from jaxdit.sharding import make_mesh
    from jaxdit.train_step import abstract_train_state

    try:
        config = Config.from_dict(json.loads((step_dir / CONFIG / "metadata").read_text()))
    except (OSError, ValueError, TypeError):
        return None  # no config, or one that _json_problem reports
    abstract = abstract_train_state(config, make_mesh(1, devices=jax.devices()[:1]))
    stored = ocp.tree.to_flat_dict(tree)
    imported = (step_dir.parent.parent / IMPORT_RECORD).is_file()
    for path, expected in ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True)).items():
        if jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key) or (imported and path[0] not in IMPORTED_PARTS):
            continue  # a key is stored as its key data; an import has no optimizer state
        if path not in stored:
            return f"{STATE}/{'.'.join(path)} is missing: the arrays are not of the model the config describes"
        if tuple(stored[path].shape) != tuple(expected.shape):
            return (
                f"{STATE}/{'.'.join(path)} has shape {tuple(stored[path].shape)}, not {tuple(expected.shape)} as the "
                "config says: the arrays are of another model"
            )
    return None


def _json_problem(path: pathlib.Path) -> str | None:
    if not path.parent.exists():  # a checkpoint saved without a config (not one of train.py's)
        return None
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path.parent.name}/{path.name}: {first_line(error)}"
    return None


def _data_problem(folder: pathlib.Path) -> str | None:
    """Each process's iterator position: process_I-of-N.json for every I < N, each JSON."""
    if not folder.exists():
        return None
    files = sorted(folder.glob("process_*-of-*.json"))
    if not files:
        return f"{DATA}/ holds no process_*-of-*.json: the data iterator's position is missing"
    count = int(files[0].stem.rsplit("-of-", 1)[1])
    for index in range(count):
        problem = _json_problem(folder / f"process_{index}-of-{count}.json")  # also a missing one
        if problem:
            return problem
    return None


def folder_size(path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
