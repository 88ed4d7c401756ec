"""A damaged checkpoint never stops a run: train.py and Pipeline.load fall back to the newest checkpoint
that reads, naming the damaged one; saves are read back and rotation keeps the newest that did; a save
that fails stops the run with a message; `python -m jaxdit.checkpoint verify` reports each checkpoint."""

import functools
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sample as sample_script
import train as train_script
from jaxdit import checkpoint as checkpoint_module
from jaxdit.checkpoint import Checkpointer, CheckpointError
from jaxdit.checkpoint import __main__ as checkpoint_cli
from jaxdit.checkpoint.__main__ import verify
from jaxdit.config import apply_overrides, load_config
from jaxdit.pipeline import Pipeline
from jaxdit.sharding import make_mesh
from jaxdit.train_loop import _check_same_run, train
from jaxdit.train_step import abstract_train_state, create_train_state

ROOT = pathlib.Path(__file__).parent.parent
TINY = ("--train.checkpoint_every", "1", "--train.keep_checkpoints", "6", "--sample.prompts", "")
CONFIG = apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [*TINY, "--train.steps", "6"])


def tiny(steps: int, *overrides: str):
    return apply_overrides(CONFIG, ["--train.steps", str(steps), *overrides])


def arrays(state) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


def restored(workdir, step=None):
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        return checkpointer.restore(abstract_train_state(CONFIG, make_mesh()), step=step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of 6 steps with a checkpoint at every one, and a checkpoint of another model."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny(6), root / "six")
    other = apply_overrides(CONFIG, ["--model.text_dim", "16"])
    with Checkpointer(root / "other" / "checkpoints") as checkpointer:
        checkpointer.save(3, create_train_state(other, abstract_train_state(other, make_mesh())), config=other.to_dict(),
                          force=True)
    return root


def copied(runs, tmp_path, *steps: int) -> pathlib.Path:
    """A copy of the 6-step run with only the checkpoints of `steps` (all by default)."""
    workdir = tmp_path / "run"
    shutil.copytree(runs / "six", workdir)
    for folder in (workdir / "checkpoints").iterdir():
        if steps and int(folder.name) not in steps:
            shutil.rmtree(folder)
    return workdir


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in (step_dir / "state").glob("ocdbt.process_*/d/*") if f.is_file()]


def _truncate(step_dir, runs=None):
    for f in _array_files(step_dir):
        with open(f, "r+b") as handle:
            handle.truncate(f.stat().st_size // 2)


def _delete(step_dir, runs):
    for f in _array_files(step_dir):
        f.unlink()


def _corrupt_metadata(step_dir, runs=None):
    (step_dir / "state" / "_METADATA").write_text("{not json")


def _drop_iterator(step_dir, runs):
    (step_dir / "data" / "process_0-of-1.json").unlink()


def _other_model(step_dir, runs):  # arrays of another model under this run's config
    shutil.rmtree(step_dir / "state")
    shutil.copytree(runs / "other" / "checkpoints" / "3" / "state", step_dir / "state")


# Each kind of damage, the checkpoint it is done to, and what the report and the warnings say of it. The
# data position is damaged in the oldest: sampling does not read it, so Pipeline.load stops there.
DAMAGE = {
    6: (_truncate, "OUT_OF_RANGE: Error reading"),
    5: (_delete, "Error reading"),
    4: (_corrupt_metadata, "state/_METADATA is missing or not JSON"),
    3: (_other_model, "the arrays are of another model"),
    2: (_drop_iterator, "the data iterator's position is missing"),
}


def test_damaged_checkpoints_are_passed_over_and_the_run_finishes_as_it_would_have(runs, tmp_path, caplog, capsys):
    workdir = copied(runs, tmp_path)
    for step, (damage, _) in DAMAGE.items():
        damage(workdir / "checkpoints" / str(step), runs)

    assert checkpoint_cli.main(["verify", str(workdir)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert report[-1] == "the newest checkpoint, 6, is damaged: a resume falls back to 1"
    for step, (_, reason) in DAMAGE.items():
        assert any(line.split()[0] == str(step) and "DAMAGED" in line and reason in line for line in report), (step, report)
    assert any(line.split()[0] == "1" and line.endswith("reads completely") for line in report)

    def fallbacks():
        found = {int(r.getMessage().split()[1]): r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()}
        caplog.clear()
        return found

    with caplog.at_level(logging.WARNING):
        pipe = Pipeline.load(workdir)
    assert pipe.step == 2  # sampling reads neither the data position nor the optimizer state
    warned = fallbacks()
    assert sorted(warned) == [3, 4, 5, 6] and all(DAMAGE[step][1] in warned[step] for step in warned)

    with caplog.at_level(logging.WARNING):
        train(tiny(6), workdir)  # resumes from 1: the state, the optimizer and the data position of step 1
    warned = fallbacks()
    assert sorted(warned) == [2, 3, 4, 5, 6] and all(DAMAGE[step][1] in warned[step] for step in warned)
    straight = arrays(restored(runs / "six"))
    assert all(np.array_equal(a, b) for a, b in zip(straight, arrays(restored(workdir)), strict=True))
    # Each damaged checkpoint was moved aside (not overwritten) when the run saved its step again.
    folders = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert folders == sorted([str(step) for step in range(1, 7)] + [f"{step}.damaged" for step in DAMAGE])
    assert verify(workdir)[1] == 0


def test_a_checkpoint_of_another_run_is_passed_over_and_can_be_quarantined(runs, tmp_path, caplog):
    workdir = copied(runs, tmp_path, 1, 2)
    shutil.copytree(runs / "other" / "checkpoints" / "3", workdir / "checkpoints" / "3")  # its config and its arrays
    check = functools.partial(_check_same_run, config=CONFIG, workdir=workdir)
    with caplog.at_level(logging.WARNING), Checkpointer(workdir / "checkpoints", quarantine=True) as checkpointer:
        state = checkpointer.restore(abstract_train_state(CONFIG, make_mesh()), check_config=check)
    assert int(state.step) == 2 and "model config differs" in caplog.text and "moved aside to" in caplog.text
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3.damaged"]
    assert all(np.array_equal(a, b) for a, b in zip(arrays(state), arrays(restored(runs / "six", 2)), strict=True))


def test_an_explicit_step_that_is_damaged_fails_in_one_line(runs, tmp_path, capsys):
    workdir = copied(runs, tmp_path, 1, 2, 3)
    _truncate(workdir / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match="checkpoint 3 .* does not read: ValueError: OUT_OF_RANGE"):
        Pipeline.load(workdir, step=3)
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main(["--workdir", str(workdir), "--step", "3", "--prompt", "a red circle", "--out",
                            str(tmp_path / "out.png")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: checkpoint 3 in " in error and "OUT_OF_RANGE" in error
    assert Pipeline.load(workdir, step=2).step == 2


def test_when_no_checkpoint_reads_train_py_says_so_in_a_paragraph(runs, tmp_path, capsys):
    workdir = copied(runs, tmp_path, 1, 2)
    for step in ("1", "2"):
        _corrupt_metadata(workdir / "checkpoints" / step)
    args = ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir), *TINY, "--train.steps", "5"]
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "python -m jaxdit.checkpoint verify" in err and "Traceback" not in err
    assert "Traceback" in (workdir / "train.log").read_text()  # the details, for a bug report
    with pytest.raises(CheckpointError):
        train_script.main([*args, "--debug"])


def test_a_missing_manifest_is_a_message_not_a_traceback(tmp_path, capsys):
    args = ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run"), "--data.source", "folder",
            "--data.manifest", str(tmp_path / "nowhere.csv")]
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere.csv" in err and "Traceback" not in err


def test_rotation_keeps_the_newest_checkpoint_that_read_back(tmp_path, monkeypatch, caplog):
    bad = {2, 3}
    monkeypatch.setattr(
        checkpoint_module, "read_problem", lambda folder, **_: "state/params: simulated" if int(folder.name) in bad else None
    )
    with Checkpointer(tmp_path, keep=1, every=1) as checkpointer:
        with caplog.at_level(logging.ERROR):
            for step in (1, 2, 3):
                checkpointer.save(step, {"x": np.full(3, step)})
                checkpointer.wait()
        assert checkpointer.all_steps() == [1, 3] and checkpointer.verified == 1  # 2 rotated out; 1 read back
        assert "CHECKPOINT 2 DOES NOT READ BACK: state/params: simulated" in caplog.text
        checkpointer.save(4, {"x": np.full(3, 4)})
        checkpointer.wait()
        assert checkpointer.all_steps() == [4] and checkpointer.verified == 4


def test_verification_reads_back_real_damage(tmp_path, caplog):
    with Checkpointer(tmp_path, keep=3, every=1, async_save=False) as checkpointer:
        checkpointer.save(1, {"x": np.arange(10**5, dtype=np.float32)})
        _truncate(tmp_path / "1")  # damaged between the commit and the reading back
        with caplog.at_level(logging.ERROR):
            checkpointer.wait()
        assert checkpointer.verified is None and "OUT_OF_RANGE" in checkpointer.damaged[1]
    assert "CHECKPOINT 1 DOES NOT READ BACK" in caplog.text


def test_a_save_that_fails_stops_the_run_and_keeps_the_earlier_checkpoints(runs, tmp_path, monkeypatch):
    workdir = copied(runs, tmp_path, 1, 2)
    save = ocp.CheckpointManager.save

    def full_disk(manager, step, *args, **kwargs):
        if step == 4:
            raise OSError(28, "No space left on device")
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointError, match="saving checkpoint 4 in .* failed: OSError: .*No space left on device"):
        train(tiny(5), workdir)
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [1, 2, 3]
    assert int(restored(workdir).step) == 3 and verify(workdir)[1] == 0


def test_python_m_jaxdit_checkpoint_verify(runs, tmp_path):
    command = [sys.executable, "-m", "jaxdit.checkpoint", "verify"]
    good = subprocess.run([*command, str(runs / "six")], capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0 and "the newest checkpoint, 6, reads" in good.stdout, good.stderr
    assert good.stdout.count("reads completely") == 6 and not good.stderr.strip()
    with pytest.raises(SystemExit):
        checkpoint_cli.main(["verify", str(tmp_path)])  # no checkpoints: the parser's message, status 2
