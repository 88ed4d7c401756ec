"""The training loop and train.py: resuming is exact, a killed run resumes from its last
complete checkpoint, two processes train like one, and bad configs fail clearly."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train as train_script
from jaxdit.checkpoint import Checkpointer
from jaxdit.config import apply_overrides, load_config
from jaxdit.sharding import make_mesh
from jaxdit.train_loop import train
from jaxdit.train_step import abstract_train_state

ROOT = pathlib.Path(__file__).parent.parent
TINY = load_config(ROOT / "configs" / "tiny.py")
# Three clip shapes, one a still, each with its global batch.
BUCKETS = ("--data.buckets", "2x16x16;2x16x32;1x16x16", "--data.bucket_batches", "8,8,16")


def tiny(*overrides: str):
    return apply_overrides(TINY, list(overrides))


def losses(workdir) -> dict[int, float]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def restored(workdir, config, step=None, mesh=None):
    mesh = mesh or make_mesh()
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        return checkpointer.restore(abstract_train_state(config, mesh), step=step)


def arrays(state) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("buckets", [(), BUCKETS], ids=["one shape", "three buckets"])
def test_two_n_steps_equal_n_steps_restart_n_steps_bit_for_bit(tmp_path, buckets):
    config = tiny("--train.steps", "4", *buckets)
    train(config, tmp_path / "straight")
    train(tiny("--train.steps", "2", *buckets), tmp_path / "restarted")
    train(config, tmp_path / "restarted")  # resumes at step 2: state, EMA, optimizer and data position
    assert losses(tmp_path / "straight") == losses(tmp_path / "restarted")
    straight, resumed = restored(tmp_path / "straight", config), restored(tmp_path / "restarted", config)
    assert int(resumed.step) == 4
    assert all(np.array_equal(a, b) for a, b in zip(arrays(straight), arrays(resumed), strict=True))


def test_a_run_resumes_onto_another_mesh(tmp_path):
    train(tiny("--train.steps", "2"), tmp_path)
    sharded_mesh = make_mesh(fsdp=4)
    state = restored(tmp_path, TINY, mesh=sharded_mesh)
    replicated = restored(tmp_path, TINY, mesh=make_mesh(devices=jax.devices()[:1]))
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
    assert all(np.array_equal(a, b) for a, b in zip(arrays(state), arrays(replicated), strict=True))
    with_context = restored(tmp_path, TINY, mesh=make_mesh(fsdp=2, context=2))  # the mesh (2, 2, 2)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(with_context), arrays(replicated), strict=True))
    metrics = train(tiny("--train.steps", "3", "--train.fsdp", "4"), tmp_path)  # and trains on from there
    assert np.isfinite(metrics["loss"]) and int(restored(tmp_path, TINY).step) == 3


def test_three_buckets_compile_three_step_programs_ahead_and_log_each_loss(tmp_path, monkeypatch, caplog):
    from jaxdit import train_loop

    lowered = []

    class AheadOnly:  # the jitted step, which the loop may only compile ahead of time, never call
        def __init__(self, step):
            self.step = step

        def lower(self, state, batch, *rest):
            lowered.append(batch["video"].shape)
            return self.step.lower(state, batch, *rest)

        def __call__(self, *args):
            pytest.fail("the loop called the jitted step: it compiles one program per bucket ahead of time")

    make = train_loop.make_train_step
    monkeypatch.setattr(train_loop, "make_train_step", lambda *a, **k: AheadOnly(make(*a, **k)))
    with caplog.at_level("INFO", logger="jaxdit.train_loop"):
        assert train(tiny("--train.steps", "6", "--train.compile_only", "true", *BUCKETS), tmp_path / "dry") == {}
    assert sorted(lowered) == [(8, 2, 16, 16, 3), (8, 2, 16, 32, 3), (16, 1, 16, 16, 3)]
    assert not (tmp_path / "dry" / "checkpoints").exists() or not list((tmp_path / "dry" / "checkpoints").iterdir())
    report = [r.getMessage() for r in caplog.records if "step compiled in" in r.getMessage()]
    assert [m.split(":")[0] for m in report] == ["bucket 2x16x16", "bucket 2x16x32", "bucket 1x16x16"]
    assert any("data: 2x16x16: " in r.getMessage() for r in caplog.records)  # the bucket report

    lowered.clear()
    metrics = train(tiny("--train.steps", "6", "--train.log_every", "6", *BUCKETS), tmp_path / "run")
    assert len(lowered) == 3 and np.isfinite(metrics["loss"])
    per_bucket = {k for k in metrics if k.startswith("loss/")}
    assert per_bucket and per_bucket <= {"loss/2x16x16", "loss/2x16x32", "loss/1x16x16"}
    assert metrics["samples_per_s"] > 0


def test_a_run_that_keeps_failing_stops_with_a_clear_error(tmp_path):
    config = tiny("--train.steps", "20", "--train.learning_rate", "1e30", "--train.max_bad_steps", "2", "--train.grad_clip", "0")
    with pytest.raises(FloatingPointError, match="not finite for 2 steps in a row"):
        train(config, tmp_path)


def test_train_py_writes_metrics_tensorboard_checkpoints_and_samples_then_resumes(tmp_path, capsys):
    samples = ["--sample.prompts", "a large red circle moving left; a small blue square moving up", "--sample.steps", "2"]
    args = ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path), *samples, "--train.steps", "2"]
    assert train_script.main([*args, "--sample.every", "1"]) == 0
    assert sorted(losses(tmp_path)) == [1, 2]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "grad_norm", "param_norm", "learning_rate", "samples_per_s"} <= set(record)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [2]
    written = sorted(path.name for path in (tmp_path / "samples").iterdir())
    assert written == [f"step_000000{step}{suffix}" for step in (1, 2) for suffix in (".mp4", ".png")]
    assert train_script.main(args[:-1] + ["3"]) == 0  # resumes at 2, runs one more step
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "samples" / "step_0000003.mp4").exists()  # the end of training always has samples
    (tmp_path / "samples" / "step_0000003.mp4").unlink()
    assert train_script.main(args[:-1] + ["3"]) == 0  # a finished run writes its missing final samples
    assert (tmp_path / "samples" / "step_0000003.mp4").exists() and sorted(losses(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.batch_size", "12"], "divisible by the 8 devices"),
        (["--model.variant", "Q/2"], "not a known variant"),
        (["--train.stepz", "3"], "unknown config field '--train.stepz'"),
        (["--train.steps", "three"], "takes a int"),
        (["--config", "configs/nope.py"], "does not exist"),
        (["--data.buckets", "2x16x16;2x16x32", "--data.bucket_keep", "1,0.00001"], "2x16x32 get no whole global batch"),
        (["--data.buckets", "2x16x16;2x16x32", "--data.bucket_batches", "8,4"], "bucket 2x16x32's global batch 4"),
    ],
)
def test_train_py_rejects_bad_configs_clearly(tmp_path, capsys, args, message):
    args = ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path), *args]
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _run_train(workdir, *extra, env=None, **popen):
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir), *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    args = ["--train.steps", "400", "--train.checkpoint_every", "3", "--train.keep_checkpoints", "2"]
    process = _run_train(tmp_path, *args)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.isdigit() and int(p.name) >= 9 for p in checkpoints.glob("*")):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # no chance to clean up, possibly in the middle of a save
    process.wait()
    complete = Checkpointer(checkpoints, read_only=True).latest_step()
    assert complete is not None and complete >= 9
    resumed = _run_train(tmp_path, "--train.steps", str(complete + 2), "--train.checkpoint_every", "3")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output
    assert f"from step {complete}" in output
    assert int(restored(tmp_path, TINY).step) == complete + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two jax.distributed processes of 4 CPU devices each, against one process of 8: three buckets, and sample
    videos included."""
    args = ["--train.steps", "3", "--sample.prompts", "a large red circle moving left", "--sample.steps", "2", *BUCKETS]
    single = _run_train(tmp_path / "one", *args)
    output, _ = single.communicate(timeout=240)
    assert single.returncode == 0, output
    port = _free_port()
    four_devices = {
        "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),  # the suite's flags otherwise
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
    }
    processes = [_run_train(tmp_path / "two", *args, env={**four_devices, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert "process 0 of 2" in outputs[0] and "process 1 of 2" in outputs[1]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
    for run in ("one", "two"):  # sampled over every device of every process, written once
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == [
            "step_0000003.mp4", "step_0000003.png", "step_0000003_sizes.png"]  # the other buckets labelled
    # A damaged newest checkpoint: both processes fall back to step 2, and step 3 is moved aside (by one
    # process, seen by both) when the run saves it again.
    for f in (tmp_path / "two" / "checkpoints" / "3" / "state").glob("ocdbt.process_*/d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    args = [*args[:1], "4", *args[2:], "--train.checkpoint_every", "1"]
    port = _free_port()
    four_devices["JAX_COORDINATOR_ADDRESS"] = f"localhost:{port}"
    processes = [_run_train(tmp_path / "two", *args, env={**four_devices, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert all("checkpoint 3 in" in out and "cannot be restored" in out for out in outputs), outputs
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "3", "3.damaged", "4"]
    assert 4 in losses(tmp_path / "two")
