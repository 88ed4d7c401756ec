"""Saves checkpoints of a 32 MB state in a loop until it is killed; tests/test_checkpoint.py runs it.

    python tests/checkpoint_writer.py DIRECTORY [KILL_AT_STEP]

Resumes after the newest checkpoint in DIRECTORY, as a restarted training run does, and prints
"saving STEP" once each save has started. With KILL_AT_STEP it SIGKILLs itself as soon as that
step's save has started, so the process dies while the step is being written.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp

from jaxdit.checkpoint import Checkpointer

MAX_STEPS = 1000  # more than any test waits for
WEIGHTS_SHAPE = (2048, 4096)  # float32: 32 MB, so that writing a step takes a while


def state_at(step: int) -> dict:
    """The state saved at `step`: a function of the step alone, so a test can recompute it."""
    return {"step": jnp.int32(step), "weights": jax.random.normal(jax.random.key(step), WEIGHTS_SHAPE)}


def config_at(step: int) -> dict:
    return {"saved_at": step}


def main(directory: str, kill_at: int | None) -> None:
    checkpointer = Checkpointer(directory, keep=2, every=1)
    latest = checkpointer.latest_step()
    start = 0 if latest is None else latest + 1
    for step in range(start, start + MAX_STEPS):
        checkpointer.save(step, state_at(step), config=config_at(step))
        print(f"saving {step}", flush=True)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
