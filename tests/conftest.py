"""Tests run on CPU with 8 simulated devices, so multi-device code is exercised everywhere."""

import os
import tempfile

# Must be set before jax is imported anywhere.
# Tests compile far more than they run: with LLVM at -O0 XLA compiles about a third faster and the
# programs compute the same values. (A test that runs hundreds of steps sets its own XLA_FLAGS.)
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session and the processes it starts (train.py runs, multi-host
# runs): the same train step is compiled once, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxdit-test-jit-cache-"))
