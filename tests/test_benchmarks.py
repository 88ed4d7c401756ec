"""The speed benchmarks run end to end on CPU at a tiny size and report finite figures (no time is asserted)."""

import importlib.util
import json
import math
import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
TRAIN_KEYS = (
    "config", "device", "devices", "batch_size", "tokens_per_sample", "flops_per_sample", "compile_s", "step_time_s",
    "samples_per_s", "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_bytes", "memory_per_device_bytes",
)
SAMPLE_KEYS = (
    "config", "device", "devices", "sampler", "steps", "cfg_scale", "batch_size", "flops_per_video", "compile_s",
    "seconds_per_video", "seconds_per_step", "videos_per_s", "tflops_per_s", "mfu", "peak_memory_bytes",
)


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_record(out: pathlib.Path, returned: dict, keys, printed: str, rate: str) -> dict:
    (line,) = out.read_text().splitlines()
    record = json.loads(line)
    assert record == json.loads(json.dumps(returned))
    assert set(keys) <= set(record)
    assert record["device"] == jax.devices()[0].device_kind and record["devices"] == jax.device_count()
    if record["device"] == "cpu":
        assert record["mfu"] is None  # no known peak
    for key in keys:
        if isinstance(record[key], float):
            assert math.isfinite(record[key]) and record[key] >= 0, key
    assert record[rate] > 0 and f"{record[rate]:.4g}" in printed
    return record


def test_train_benchmark(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["--config", TINY, "--steps", "1", "--warmup", "0", "--out", str(out), "--profile", str(tmp_path / "prof")]
    returned = benchmark("train").main(argv)
    assert list((tmp_path / "prof").rglob("*.xplane.pb"))  # the jax.profiler trace of the extra steps
    record = check_record(out, returned, TRAIN_KEYS, capsys.readouterr().out, "samples_per_s")
    benchmark("profile_summary").main([str(tmp_path / "prof"), "--top", "5"])  # where the traced steps' time went
    summary = capsys.readouterr().out
    assert "host CPU" in summary and "matmul" in summary and len(summary.splitlines()) > 8
    assert record["config"] == "tiny" and record["batch_size"] == 8
    assert record["flops_per_sample"] > 0 and record["tokens_per_sample"] == 32  # 2x16x16 pixels in 1x4x4 patches
    assert record["tflops_per_s"] == pytest.approx(record["flops_per_sample"] * record["samples_per_s"] / 1e12)
    assert math.isfinite(record["loss"])
    assert record["mesh"] == {"data": 8, "fsdp": 1, "context": 1}
    assert record["memory_per_device_bytes"] >= record["temp_bytes"] > 0  # XLA's account, also on CPU


def test_sample_benchmark(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["--config", TINY, "--steps", "2", "--repeats", "1", "--cfg-scale", "2", "--out", str(out)]
    returned = benchmark("sample").main(argv)
    record = check_record(out, returned, SAMPLE_KEYS, capsys.readouterr().out, "videos_per_s")
    assert record["guided"] and record["batch_size"] == jax.local_device_count()  # one video per device
    assert record["video_shape"] == [2, 16, 16, 3] and record["flops_per_video"] > 0
    assert record["seconds_per_video"] == pytest.approx(record["seconds_per_call"] / record["batch_size"])


def test_compare_torch_benchmark(tmp_path, capsys):
    pytest.importorskip("torch", reason="benchmarks/compare_torch.py needs torch: pip install -e '.[compare]'")
    pytest.importorskip("diffusers", reason="benchmarks/compare_torch.py needs diffusers: pip install -e '.[compare]'")
    out = tmp_path / "compare.jsonl"
    argv = ["--preset", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "0", "--parts", "--out", str(out)]
    returned = benchmark("compare_torch").main(argv)
    keys = ("config", "device", "devices", "batch_size", "jaxdit_step_s", "torch_step_s", "speedup", "jaxdit_compile_s")
    record = check_record(out, returned, keys, capsys.readouterr().out, "speedup")
    assert record["speedup"] == pytest.approx(record["torch_step_s"] / record["jaxdit_step_s"])
    assert record["jaxdit_params"] == record["torch_params"]  # the same network on both sides
    # The same objective on both sides: adaLN-Zero predicts zero at first, so each first loss is E[noise^2] = 1.
    assert record["jaxdit_first_loss"] == pytest.approx(1.0, abs=0.1)
    assert record["torch_first_loss"] == pytest.approx(1.0, abs=0.1)
    parts = [f"dense_{product}_{side}_gflops" for product in ("forward", "input_grad", "weight_grad")
             for side in ("jaxdit", "torch")] + [f"{part}_{side}_ms" for part in ("attention", "block") for side in ("jaxdit", "torch")]
    assert all(math.isfinite(record[key]) and record[key] > 0 for key in parts), {key: record.get(key) for key in parts}


def test_compare_wan_benchmark():
    pytest.importorskip("torch", reason="benchmarks/compare_wan.py needs torch: pip install -e '.[compare]'")
    pytest.importorskip("diffusers", reason="benchmarks/compare_wan.py needs diffusers: pip install -e '.[compare]'")
    figures = benchmark("compare_wan").main(["--layers", "1", "--frames", "1", "--height", "4", "--width", "4",
                                              "--steps", "2", "--rounds", "1"])
    assert figures["forward_difference"] < 1e-4 and figures["sampling_difference"] < 1e-4  # the same model on both sides
    for part in ("forward", "sampling"):
        assert figures[part]["speedup"] == pytest.approx(figures[part]["pytorch"] / figures[part]["jaxdit"])


def test_prompt_adherence_shape_confusion():
    """Real clips are read as the shape asked; a caption asking another shape lands off the diagonal."""
    from jaxdit.data.judge import judge
    from jaxdit.data.shapes import SHAPES, ShapesDataset

    adherence = benchmark("prompt_adherence")
    data = ShapesDataset(num_frames=8, size=32, seed=3)
    items = [data[i] for i in range(12)]
    verdicts = [v for item in items for v in judge(item["video"], item["caption"])]
    counts = adherence.shape_confusion(verdicts)
    assert sum(counts.values()) == len(items)
    assert sum(counts[s, s] for s in SHAPES) >= len(items) - 1  # the judge is 97%+ right on real clips
    wrong = [v for item in items for v in judge(item["video"], item["caption"].replace("circle", "square"))]
    asked_square = adherence.shape_confusion(wrong)
    assert asked_square["square", "circle"] == counts["circle", "circle"] + counts["square", "circle"]
    assert asked_square["circle", "circle"] == 0
    table = adherence.format_confusion(counts).splitlines()
    assert len(table) == 1 + len(SHAPES) and table[0].split()[-1] == "-"
