"""jaxdit.host: `import jaxdit` makes malloc keep freed memory, so a step's buffers stop faulting in; jaxdit's
programs on CPU compile with XLA's loop emitters, and compute what XLA's defaults compute."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from jaxdit import host
from tests.helpers import inputs, randomized, tiny_config

# In a fresh interpreter, as XLA:CPU's threads do: a thread mallocs an 8 MiB buffer, writes it and
# frees it, five times; printed, the page faults of each repeat.
_SCRIPT = """
import ctypes, resource, sys, threading
if sys.argv[1] == "import":
    import jaxdit
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = []
def work():
    for i in range(5):
        buffer = libc.malloc(8 << 20); ctypes.memset(buffer, 1, 8 << 20); libc.free(buffer)
        if i in (0, 4):
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt)
thread = threading.Thread(target=work); thread.start(); thread.join()
print((faults[1] - faults[0]) // 4)
"""
PAGES = (8 << 20) // os.sysconf("SC_PAGE_SIZE")  # in one 8 MiB buffer


def _faults_per_buffer(mode: str, **env) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    run = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return int(run.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_import_keeps_freed_memory_and_a_user_malloc_setting_wins(monkeypatch):
    assert _faults_per_buffer("plain") > PAGES // 8  # glibc's default: the thread's arena gives the pages back
    assert _faults_per_buffer("import") < PAGES // 100  # after `import jaxdit` the buffer is reused as it is
    assert _faults_per_buffer("import", MALLOC_ARENA_MAX="8") > PAGES // 8  # the user's setting is kept
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert host.keep_freed_memory() is False


def test_cpu_programs_take_the_loop_emitters_unless_xla_flags_choose(monkeypatch):
    assert host.compiler_options("gpu") == {} and host.compiler_options("tpu") == {}
    if jax.__version_info__ < (0, 11):  # jaxlib 0.11 and newer have no such option (a test below)
        assert host.compiler_options("cpu") == host.CPU_COMPILER_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=true")
    assert host.compiler_options("cpu") == {}  # the user's choice stands


def test_a_jaxlib_without_the_option_compiles_with_its_defaults(monkeypatch):
    # jaxlib 0.11 and 0.12 dropped xla_cpu_use_fusion_emitters: an option XLA does not know would fail
    # every compile, so the probe must leave it out. Here an option that no jaxlib knows stands for it.
    monkeypatch.setattr(host, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_for_jaxdit": False})
    host._cpu_accepts_options.cache_clear()
    try:
        assert host.compiler_options("cpu") == {}
    finally:
        host._cpu_accepts_options.cache_clear()  # the real options' probe runs again when next asked


@pytest.mark.skipif(not host.compiler_options("cpu"), reason="this jaxlib has no loop emitters to compare")
def test_the_loop_emitters_compute_the_model_and_its_gradients_as_the_defaults():
    config = tiny_config(text_dim=16)
    graphdef, state = nnx.split(randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))))
    x, t, conditions = inputs(config)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(x, t, **conditions) ** 2)

    defaults = jax.jit(jax.value_and_grad(loss))(state)
    loops = jax.jit(jax.value_and_grad(loss), compiler_options=host.compiler_options("cpu"))(state)
    # Float32 rounding apart, at the scale of each array (a tiny entry of a large gradient differs more).
    for default, loop in zip(jax.tree.leaves(defaults), jax.tree.leaves(loops), strict=True):
        assert np.abs(loop - default).max() <= 1e-5 * np.abs(default).max() + 1e-8
