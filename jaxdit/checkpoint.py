"""Checkpoints of a training run, with orbax: the train state, the data iterator and the config.

A run's checkpoints live under one directory (e.g. `runs/NAME/checkpoints`), one folder per step:

    checkpoints/1000/state/                      the train state: any pytree of jax.Arrays, sharded or not
    checkpoints/1000/data/process_0-of-1.json    each process's data iterator position (grain's handler)
    checkpoints/1000/config/                     the run's config as JSON (written by the primary process)

Saves are asynchronous: `save` returns once the arrays are copied off the device and the iterator's
position is recorded, and the files are written in the background. A checkpoint is written into
`STEP.orbax-checkpoint-tmp` and renamed to `STEP` only when every item is complete, so a process
killed mid-save leaves a tmp folder that no reader ever picks up; the next writer deletes it.

Every process of a multi-host run calls `save` and `restore` alike; orbax coordinates them.
"""

import json
import logging
import os

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"  # the items of one checkpoint
IMPORT_RECORD = "imported.json"  # in a run directory of imported weights (jaxdit.convert): their source


def _item_handlers() -> dict:
    return {
        STATE: ocp.StandardCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }


def _read_only_options() -> ocp.CheckpointManagerOptions:
    # The values read_only forces anyway, spelled out so that orbax does not warn about each one.
    return ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, max_to_keep=None, create=False, cleanup_tmp_directories=False
    )


class _IteratorPosition:
    """A data iterator's state frozen at the moment of `save`, in the form grain's handler writes.

    Orbax may run a synchronous handler such as grain's after `save` has returned; by then the
    training loop has moved the live iterator on, so the handler is given this copy instead.
    """

    def __init__(self, iterator):
        state = iterator.get_state()  # a dict for a grain.DatasetIterator, bytes for a grain.DataLoader's
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Saves and restores a run under `directory` (e.g. `runs/NAME/checkpoints`).

    keep: how many of the newest checkpoints to keep (None keeps all).
    every: saves happen at steps that are multiples of `every`; `save(..., force=True)` saves at any step.
    async_save: write in the background (the default) or before `save` returns.
    read_only: only read (for sampling or evaluation next to a running training): creates nothing and
        leaves the tmp folders of an in-progress save alone, where a writer deletes them.
    """

    def __init__(
        self, directory, *, keep: int | None = 3, every: int = 1000, async_save: bool = True, read_only: bool = False
    ):
        if read_only:
            options = _read_only_options()
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=every,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # the half-written saves of a killed process
            )
        # Absolute: orbax's array writer rejects a relative path when another checkpointer (a codec's) ran meanwhile.
        directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
        self.directory = self._manager.directory
        self.read_only, self.every = read_only, every
        self._last_saved: int | None = None  # the step of this object's newest save, maybe still in flight

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position and the config) as `step`; True if it saves.

        Unless `force`, skips steps that are not a multiple of `every` or not after the newest
        checkpoint; never overwrites a checkpoint.
        Returns once the arrays are copied, so the caller may donate or change `state` right away.
        """
        if self.read_only:  # orbax's read_only stops interval saves but not forced ones
            raise ValueError(f"this Checkpointer of {self.directory} is read-only; make one without read_only to save.")
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            log.info("step %d is already checkpointed in %s; not saving it again", step, self.directory)
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_iterator))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            self._last_saved = step
        return saved

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first; a save still being written is not one."""
        steps = sorted(self._manager.all_steps())
        if self._last_saved in steps and self._manager.is_saving_in_progress():
            steps.remove(self._last_saved)
        return steps

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None):
        """The train state of `step` (default: the newest), laid out as `abstract_state` says.

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct`s with shardings (e.g. from
        `jax.eval_shape` of the init, given the shardings the new run wants), so a run can resume on
        another mesh or device count. Restores `data_iterator` (this process's) in place when given.
        """
        step = self._existing_step(step)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored step %d from %s", step, self.directory)
        return restored[STATE]

    def restore_weights(self, abstract_state, *, step: int | None = None) -> dict:
        """Only what sampling needs: {"ema", "model_rngs"} of `step`'s state, laid out as `abstract_state` says.

        The parameters and optimizer moments are never read, so a reader needs a third of the memory.
        """
        step = self._existing_step(step)
        target = {"ema": abstract_state.ema, "model_rngs": abstract_state.model_rngs}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(self.directory / str(step) / STATE, args=args)

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the newest checkpoint)."""
        step = self._existing_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def _existing_step(self, step: int | None) -> int:
        self.wait()  # restore what this process saved, and keep a finishing save from deleting it meanwhile
        self._manager.reload()  # see the checkpoints other writers finished since this object was made
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}: train first (train.py writes checkpoints there), "
                "or point to the checkpoints folder of a run that has saved one."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory}; its checkpoints are of steps {steps}. "
                "Pass one of those, or no step for the newest."
            )
        return step

    def wait(self):
        """Blocks until the pending saves are written; raises what went wrong in them."""
        self._manager.wait_until_finished()

    def close(self):
        """Waits for the pending saves, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def latest_step(directory) -> int | None:
    """The newest complete checkpoint's step under `directory`, or None (also when it does not exist)."""
    manager = ocp.CheckpointManager(directory, options=_read_only_options(), item_handlers=_item_handlers())
    try:
        return manager.latest_step()
    finally:
        manager.close()
