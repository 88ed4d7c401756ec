"""Checkpoints of a training run, with orbax: the train state, the data iterator and the config.

A run's checkpoints live under one directory (e.g. `runs/NAME/checkpoints`), one folder per step:

    checkpoints/1000/state/                      the train state: any pytree of jax.Arrays, sharded or not
    checkpoints/1000/data/process_0-of-1.json    each process's data iterator position (grain's handler)
    checkpoints/1000/config/                     the run's config as JSON (written by the primary process)

Saves are asynchronous: `save` returns once the arrays are copied off the device and the iterator's
position is recorded, and the files are written in the background. A checkpoint is written into
`STEP.orbax-checkpoint-tmp` and renamed to `STEP` only when every item is complete, so a process
killed mid-save leaves a tmp folder that no reader ever picks up; the next writer deletes it.

A checkpoint can still be damaged after it committed (a disk that fails, a copy that stopped part-way):
- once a save commits, the primary process reads it back in the background (`verify.read_problem`) and
  logs an error at once if it does not read; rotation (`keep`) never deletes the newest checkpoint
  that read back, so a good one always remains;
- a restore of the newest checkpoint falls back to the newest one that reads, with one warning per
  damaged checkpoint that names it and why. The damaged one is left where it is (moved aside to
  `STEP.damaged` with `quarantine=True`, or when a resumed run reaches its step again and saves there);
  a restore of a step asked for by number never falls back;
- a save that fails (a full disk, no permission) raises a CheckpointError; the earlier checkpoints
  are untouched.
`python -m jaxdit.checkpoint verify RUN` reads every checkpoint of a run and says which are damaged.

Every process of a multi-host run calls `save` and `restore` alike; orbax coordinates them.
"""

import concurrent.futures
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdit.checkpoint.verify import CONFIG, DATA, STATE, read_problem
from jaxdit.checkpoint.verify import IMPORT_RECORD as IMPORT_RECORD  # where jaxdit.convert writes it
from jaxdit.config import ConfigError
from jaxdit.orbax_reads import first_line, quiet_failed_reads

log = logging.getLogger(__name__)



def _item_handlers(save_concurrent_gb: int | None = None) -> dict:
    limit = {} if save_concurrent_gb is None else {"save_concurrent_gb": save_concurrent_gb}
    return {
        STATE: ocp.StandardCheckpointHandler(**limit),
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names it, why, and what to do."""


class Checkpointer:
    """Saves and restores a run under `directory` (e.g. `runs/NAME/checkpoints`).

    keep: how many of the newest checkpoints to keep (None keeps all); the newest one that read back
        completely is kept too.
    every: saves happen at steps that are multiples of `every`; `save(..., force=True)` saves at any step.
    async_save: write in the background (the default) or before `save` returns.
    read_only: only read (for sampling or evaluation next to a running training): creates nothing and
        leaves the tmp folders of an in-progress save alone, where a writer deletes them.
    quarantine: a restore that falls back moves the damaged checkpoints aside to `STEP.damaged`.
    save_concurrent_gb: the most gigabytes of arrays being written at once (None: orbax's default, 96),
        which bounds the host memory a save needs beyond the arrays themselves.
    """

    def __init__(
        self, directory, *, keep: int | None = 3, every: int = 1000, async_save: bool = True, read_only: bool = False,
        quarantine: bool = False, save_concurrent_gb: int | None = None,
    ):
        if read_only:
            options = _read_only_options()
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None,  # rotation is this class's: it keeps the newest checkpoint that verified
                save_interval_steps=every,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # the half-written saves of a killed process
            )
        # Absolute: orbax's array writer rejects a relative path when another checkpointer (a codec's) ran meanwhile.
        directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            directory, options=options, item_handlers=_item_handlers(save_concurrent_gb)
        )
        self.directory = self._manager.directory
        self.read_only, self.every, self.keep, self.quarantine = read_only, every, keep, quarantine
        self._last_saved: int | None = None  # the step of this object's newest save, maybe still in flight
        # Reading back what was saved: the primary process checks each save once it commits.
        self._checks = not read_only and jax.process_index() == 0
        self._unchecked: int | None = None  # committed or committing, not yet read back
        self._checking: tuple[int, concurrent.futures.Future] | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-verify")
        self.verified: int | None = None  # the newest step that read back completely
        self.damaged: dict[int, str] = {}  # step -> why it does not read, as found by this object

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position and the config) as `step`; True if it saves.

        Unless `force`, skips steps that are not a multiple of `every` or not after the newest
        checkpoint; never overwrites a checkpoint (a damaged one at `step` is moved aside first).
        Returns once the arrays are copied, so the caller may donate or change `state` right away.
        Called every step, it also reads back the last save once it has committed.
        """
        if self.read_only:  # orbax's read_only stops interval saves but not forced ones
            raise ValueError(f"this Checkpointer of {self.directory} is read-only; make one without read_only to save.")
        self._check_saved(block=False)
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            if step not in self.damaged:
                log.info("step %d is already checkpointed in %s; not saving it again", step, self.directory)
                return False
            self._move_aside(step)
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_iterator))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._save_error(step, error) from error
        if saved:
            self._last_saved = self._unchecked = step
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

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None, check_config=None):
        """The train state of `step`, or of the newest checkpoint that reads, laid out as `abstract_state` says.

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct`s with shardings (e.g. from
        `jax.eval_shape` of the init, given the shardings the new run wants), so a run can resume on
        another mesh or device count. Restores `data_iterator` (this process's) in place when given.
        check_config: called with each candidate's saved config; what it raises makes that checkpoint
        unusable (a checkpoint of another run copied in beside this one's).
        """

        def read(step):
            if check_config is not None:
                check_config(self._restore_config(step))
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

        step, state = self.newest_readable(read, step=step)
        log.info("restored step %d from %s", step, self.directory)
        return state

    def restore_weights(self, abstract_state, *, step: int | None = None) -> dict:
        """Only what sampling needs: {"ema", "model_rngs"} of `step`'s state, laid out as `abstract_state` says.

        The parameters and optimizer moments are never read, so a reader needs a third of the memory.
        Does not fall back: `newest_readable` does, around this and the config it needs.
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
        return self._restore_config(self._existing_step(step))

    def _restore_config(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def newest_readable(self, read, *, step: int | None = None):
        """(step, read(step)) for `step`, or else for the newest checkpoint where `read` succeeds.

        Each newer checkpoint that fails is named in one warning, with why, and left where it is
        (moved aside with `quarantine`). An explicit `step` that fails raises a one-line
        CheckpointError; when no checkpoint reads, a CheckpointError names each one (or the newest's
        ConfigError, when every one was refused by the config check: a run resumed with other settings).
        """
        newest = self._existing_step(step)  # raises when there is none, or no such step
        steps = [newest] if step is not None else self.all_steps()[::-1]
        failures = []
        for candidate in steps:
            try:
                with quiet_failed_reads():
                    value = read(candidate)
            except Exception as error:
                failures.append((candidate, error))
                continue
            for bad, error in failures:
                self._fell_back(bad, error, candidate)
            return candidate, value
        error = failures[0][1]
        if step is not None:
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not read: {first_line(error)}.") from error
        if all(isinstance(e, ConfigError) for _, e in failures):
            raise error
        listed = "; ".join(f"{s}: {first_line(e)}" for s, e in failures)
        raise CheckpointError(
            f"no checkpoint in {self.directory} reads ({listed}). Check the run with python -m jaxdit.checkpoint "
            f"verify {self.directory.parent}; copy the checkpoints again if they came from elsewhere, or train into "
            "a new --workdir."
        ) from error

    def _fell_back(self, step: int, error: Exception, used: int) -> None:
        # The restore's error may not say which file failed; reading the whole checkpoint names it.
        why = read_problem(self.directory / str(step)) or first_line(error)
        self.damaged[step] = why
        if self.quarantine and not self.read_only:
            kept = f"moved aside to {self._move_aside(step)}"
        else:
            kept = (
                "left in place (train.quarantine_damaged moves such a checkpoint aside; a resumed run moves it aside "
                "when it saves that step again)"
            )
        log.warning(
            "checkpoint %d in %s cannot be restored (%s); using checkpoint %d, the newest that reads. The damaged one is %s. "
            "python -m jaxdit.checkpoint verify %s checks every checkpoint of the run.",
            step, self.directory, why, used, kept, self.directory.parent,
        )

    def _move_aside(self, step: int):
        """Renames checkpoint `step` to `STEP.damaged` (or `.damaged.2`, ...): kept, never overwritten.
        Every process calls it; the primary renames, and all see the result before going on."""
        target, n = self.directory / f"{step}.damaged", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.damaged.{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
            log.warning("moved damaged checkpoint %d aside to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxdit checkpoint {step} moved aside")
        self._manager.reload()
        return target

    def _check_saved(self, *, block: bool) -> None:
        """Reads back the last save once it commits (in the background unless `block`), logs an error at
        once if it does not read, then rotates. Raises a CheckpointError if the save itself failed."""
        if not self._checks:
            return
        if self._unchecked is not None and (block or not self._manager.is_saving_in_progress()):
            step, self._unchecked = self._unchecked, None
            try:
                self._manager.wait_until_finished()  # returns at once, or raises what failed in the background
            except Exception as error:
                raise self._save_error(step, error) from error
            folder = self.directory / str(step)
            self._checking = (step, self._reader.submit(read_problem, folder, check_shapes=False))
        if self._checking is not None and (block or self._checking[1].done()):
            (step, future), self._checking = self._checking, None
            problem = future.result()
            if problem is None:
                self.verified = step
            else:
                self.damaged[step] = problem
                log.error(
                    "CHECKPOINT %d DOES NOT READ BACK: %s. The disk or filesystem under %s may be failing or full; "
                    "the earlier checkpoints are kept (newest that reads: %s).",
                    step, problem, self.directory, self.verified,
                )
            self._rotate()

    def _rotate(self) -> None:
        """Deletes all but the `keep` newest checkpoints, never the newest one that read back."""
        if self.keep is None:
            return
        steps = self.all_steps()
        kept = set(steps[-self.keep:]) | {self.verified}
        for step in steps:
            if step not in kept:
                (self.directory / str(step)).rmtree()
        self._manager.reload()

    def _save_error(self, step: int, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed: {first_line(error)}. Free disk space or fix the "
            f"folder's permissions, then run the same command again: it resumes from the newest checkpoint that reads "
            f"({self.verified if self.verified is not None else 'see python -m jaxdit.checkpoint verify'}); "
            "the earlier checkpoints are untouched."
        )

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
        """Blocks until the pending saves are written and read back; raises what went wrong in them."""
        if self._checks:
            self._check_saved(block=True)
        else:
            self._manager.wait_until_finished()

    def close(self):
        """Waits for the pending saves (and their reading back), then releases orbax's threads."""
        try:
            if not self.read_only:
                self.wait()
        finally:
            self._reader.shutdown()
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
