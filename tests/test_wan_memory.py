"""benchmarks/wan_memory.py compiles Wan 2.1 1.3B's guided step from abstract inputs on 8 simulated
devices (a short clip: the full model, small activations) and prints its memory; no figure is asserted
but the parameters' share, which is arithmetic."""

import pytest

from tests.test_benchmarks import benchmark

WAN_1_3B_PARAMETERS = 1_418_996_800  # diffusers' WanTransformer3DModel at Wan2.1-T2V-1.3B's config


def test_wan_memory_prints_the_memory_of_a_guided_step_on_a_mesh(capsys):
    argv = ["--variants", "wan1.3B", "--layouts", "2x4", "--param-dtypes", "bfloat16", "--latents", "1x4x8x16",
            "--text-tokens", "8"]
    (row,) = benchmark("wan_memory").main(argv)
    printed = capsys.readouterr().out
    assert row["params"] == WAN_1_3B_PARAMETERS and row["tokens"] == 8
    assert row["param_bytes_per_device"] == pytest.approx(WAN_1_3B_PARAMETERS * 2 / 2, rel=1e-3)  # bf16, fsdp 2
    assert row["arguments"] >= row["param_bytes_per_device"] and row["temp"] > 0
    assert row["total"] >= row["arguments"] + row["temp"] and row["temp_no_scores"] > 0
    assert row["attention"] == "xla (ulysses 4 x ring 1)"
    assert "| wan1.3B | 2 x 4 | xla (ulysses 4 x ring 1) | bfloat16 |" in printed and "jax " in printed
