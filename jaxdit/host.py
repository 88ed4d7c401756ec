"""XLA:CPU on the host: malloc that keeps the memory XLA frees, and the compiler options of jaxdit's programs.

Each XLA:CPU execution allocates its buffers afresh (70 MB of temporaries a step in the default
run). By default glibc hands out blocks above 128 KiB with mmap, or from per-thread arenas that it
trims, and gives the pages back on free; the next step then faults every page in again. Measured
on 2 CPU cores (the default run's train step): 20,600 page faults and 50 ms of kernel time per
step, against 300 faults and 4 ms with one arena that keeps what is freed, and the step 15-25%
faster. GPU and TPU steps do not allocate this way, and one arena costs them nothing.

`import jaxdit` calls `keep_freed_memory()`, before jax starts its threads (they then share the
one arena). Setting any MALLOC_* variable (or GLIBC_TUNABLES) keeps glibc's own behaviour.

`compiler_options(platform)` is what jaxdit's jitted programs (the train step, the sampler, the codec)
pass to XLA. On CPU it selects XLA:CPU's loop emitters over its newer MLIR fusion emitters, which run
the element-wise fusions of these programs slower: measured on a 2-core Xeon with jax 0.10.2, the
default run's train step took 0.072 s with the fusion emitters and 0.053 s without, DiT-S/2's 2.00 s
and 1.87 s, and the optimizer's per-parameter updates of the default model 14.5 ms and 10.6 ms.
A user's own `--xla_cpu_use_fusion_emitters` in XLA_FLAGS is kept, and a jaxlib that no longer knows
the option gets none: jaxlib 0.11 and 0.12 have only the fusion emitters.
"""

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, which is reused
_TRIM_THRESHOLD = 2**31 - 1  # never give freed heap back to the OS


def keep_freed_memory() -> bool:
    """One malloc arena that keeps freed memory for reuse; True where it was set.

    Does nothing (False) off glibc, or where the user chose malloc settings through any
    MALLOC_*_ environment variable (glibc's tunables): theirs are kept.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        log.warning("glibc's mallopt refused a setting; XLA:CPU steps may spend time faulting memory in")
    return ok


# XLA:CPU's loop emitters, not its MLIR fusion emitters (the module docstring says why).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(platform: str) -> dict:
    """The XLA options of a jaxdit program that runs on `platform`'s devices ("cpu", "gpu", "tpu"):
    CPU_COMPILER_OPTIONS on CPU, none elsewhere, none where XLA_FLAGS sets them itself."""
    if platform != "cpu" or any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_COMPILER_OPTIONS):
        return {}
    return dict(CPU_COMPILER_OPTIONS) if _cpu_accepts_options() else {}


@functools.cache
def _cpu_accepts_options() -> bool:
    """Whether this jaxlib's XLA:CPU compiles with CPU_COMPILER_OPTIONS (a later one may drop them)."""
    import jax

    try:
        one = jax.device_put(1.0, jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(one).compile()
    except Exception as error:  # XLA names an unknown option in a runtime error
        log.info("XLA:CPU compiles jaxdit's programs with its defaults: %s", error)
        return False
    return True
