"""Tests run on CPU with 8 simulated devices, so multi-device code is exercised everywhere."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
