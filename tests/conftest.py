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

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

WAN_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_pipeline"
WAN_TEXT_LENGTH = 24  # the umT5 tokens of tests/fixtures/wan_pipeline/make_fixture.py


@pytest.fixture(scope="session")
def wan_tiny_source(tmp_path_factory) -> pathlib.Path:
    """The tiny diffusers Wan 2.1 T2V folder of tests/fixtures/wan_pipeline, assembled once per session (read only)."""
    sys.path.insert(0, str(WAN_FIXTURE))
    from assemble import assemble

    return assemble(tmp_path_factory.mktemp("diffusers") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="session")
def wan_tiny_run(wan_tiny_source, tmp_path_factory) -> pathlib.Path:
    """That folder converted by `python -m jaxdit.convert.wan` (the command, in-process), once per session: an
    imported run that tests sample, fine-tune and adapt, never change."""
    from jaxdit.convert import wan

    out = tmp_path_factory.mktemp("runs") / "wan_tiny"
    wan.main([str(wan_tiny_source), "--out", str(out), "--text-length", str(WAN_TEXT_LENGTH)])
    return out
