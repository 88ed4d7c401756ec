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


def test_wan_finetune_prints_the_memory_of_a_lora_train_step(capsys):
    argv = ["--variants", "wan1.3B", "--depth", "1", "--modes", "lora", "--layouts", "2x2x1", "--latents", "1x4x4x16",
            "--text-tokens", "8"]
    (row,) = benchmark("wan_finetune").main(argv)
    # Rank 64 on one 1.3B block (width 1536, MLP 8960): qkv 3 adapters, kv 2, the 3 other projections and the MLP's 2;
    # the frozen base is the 1.3B model with 1 of its 30 blocks (29 blocks of 46,440,704 fewer).
    qkv, square, kv, mlp = 1536 * 192 + 3 * 64 * 1536, 2 * 1536 * 64, 1536 * 128 + 2 * 64 * 1536, 1536 * 64 + 64 * 8960
    assert row["trained"] == qkv + 3 * square + kv + 2 * mlp == 2_916_352
    assert row["frozen"] == WAN_1_3B_PARAMETERS - 29 * 46_440_704 and row["batch"] == 2 and row["step_s"] is None
    assert row["total"] >= row["arguments"] > 0 and row["temp"] > 0
    assert "| 1536x1x12 | lora | 2 (2 x 1) | 2 | 2.9 M /" in capsys.readouterr().out
