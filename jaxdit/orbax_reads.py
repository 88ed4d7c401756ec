"""Reading orbax checkpoints that may be damaged: one-line reasons, and no tracebacks for the reads a
failed restore abandons. Used by jaxdit.checkpoint and by the codec loader; imports nothing of jaxdit.
"""

import contextlib
import gc
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def quiet_failed_reads():
    """Reads of a checkpoint that may be damaged, without tracebacks for the reads it abandons.

    When one array fails, orbax stops the restore and closes its event loop while tensorstore's reads
    of the other arrays are still in flight: those end as asyncio tasks whose errors nobody retrieves
    (asyncio logs each when it is collected), coroutines that fail as they are closed, and callbacks
    into the closed loop (Python prints each as an unraisable RuntimeError, also later). All of it is
    noise after the first error, which is raised as usual.
    """
    logger, hook = logging.getLogger("asyncio"), sys.unraisablehook
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = _ignoring_closed_loops(hook)
    failed = False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        if failed:  # the abandoned reads' coroutines and tasks, closed as they are collected
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
                gc.collect()
        logger.setLevel(level)
        # After a failure, late callbacks and coroutines the error's traceback holds are still to come.
        sys.unraisablehook = _ignoring_closed_loops(hook) if failed else hook


def _ignoring_closed_loops(hook):
    """`hook`, except for what abandoned reads leave: callbacks into a closed event loop, and orbax's
    read coroutines closed unfinished."""
    if getattr(hook, "ignores_closed_loops", False):
        return hook

    def ignore(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if not (closed_loop or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)):
            hook(unraisable)

    ignore.ignores_closed_loops = True
    return ignore


def first_line(error: BaseException) -> str:
    """An exception as one line: the type and first message line of the error at the root of its chain
    (orbax wraps tensorstore's error, which names the array and the file, in a vaguer one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
