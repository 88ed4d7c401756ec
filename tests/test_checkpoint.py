import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxdit.checkpoint import Checkpointer, latest_step
from tests.checkpoint_writer import config_at, state_at

REPO = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("checkpoint_writer.py")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 ()
    params: nnx.State
    opt_state: optax.OptState
    key: jax.Array  # uint32 (2,): the data of a PRNG key


def train_state() -> TrainState:
    """A state after one adamw update, so that the optimizer's moments are not zeros."""
    _, params = nnx.split(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-2)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    key = jax.random.key_data(jax.random.key(7))
    return TrainState(step=jnp.int32(1), params=optax.apply_updates(params, updates), opt_state=opt_state, key=key)


def abstract(tree):
    """What a resuming run passes to restore: shapes, dtypes and where each array goes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bit_identical(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def step_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.isdigit())


def tmp_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "tmp" in p.name)


def test_round_trip_is_bit_identical(tmp_path):
    state = train_state()
    assert state.opt_state[0].count.dtype == jnp.int32 and state.key.dtype == jnp.uint32
    config = {"model": {"variant": "tiny/2x2x2"}, "train": {"steps": 10, "lr": 1e-3}, "tags": ["a", "b"], "note": None}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.save(1, state, config=config, force=True)
        restored = checkpointer.restore(abstract(state))
        assert checkpointer.restore_config() == config
    assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
    assert_bit_identical(restored, state)


def test_keeps_the_last_checkpoints_and_saves_every_interval(tmp_path):
    def state(step):
        return {"x": jnp.full((2,), step)}

    with Checkpointer(tmp_path, keep=2, every=3) as checkpointer:
        assert [step for step in range(11) if checkpointer.save(step, state(step))] == [0, 3, 6, 9]
        assert checkpointer.save(10, state(10), force=True)
        assert not checkpointer.save(10, state(10), force=True)  # never overwrites a checkpoint
        checkpointer.wait()
        assert checkpointer.all_steps() == [9, 10] and checkpointer.latest_step() == 10
        np.testing.assert_array_equal(checkpointer.restore(abstract(state(0)), step=9)["x"], [9, 9])
    assert step_folders(tmp_path) == ["10", "9"]
    assert latest_step(tmp_path) == 10


def test_restores_the_data_iterator_where_it_was_saved(tmp_path):
    dataset = grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = {"x": jnp.zeros(3)}
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(5, state, data_iterator=iterator, force=True)
        # The save is still being written while the loop moves on; the position saved is the one at the call.
        expected = [next(iterator) for _ in range(3)]
        checkpointer.wait()
        resumed = iter(dataset)
        checkpointer.restore(abstract(state), data_iterator=resumed)
    assert (tmp_path / "5" / "data" / "process_0-of-1.json").exists()
    got = [next(resumed) for _ in range(3)]
    assert not np.array_equal(next(iter(dataset)), expected[0])  # a restore that did nothing would show
    for got_batch, expected_batch in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_batch, expected_batch)


def test_restores_onto_another_mesh(tmp_path):
    mesh8 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    values = np.arange(64, dtype=np.float32).reshape(16, 4)
    state = {"x": jax.device_put(values, NamedSharding(mesh8, P("data")))}
    mesh2x4 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    targets = [NamedSharding(mesh2x4, P("data", "model")), SingleDeviceSharding(jax.devices()[3])]
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(0, state)
        for sharding in targets:
            restored = checkpointer.restore({"x": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding)})
            assert restored["x"].sharding == sharding
            np.testing.assert_array_equal(restored["x"], values)


def test_state_may_be_donated_right_after_save(tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (512, 512))}
    expected = np.array(state["w"])
    update = jax.jit(lambda s: jax.tree.map(lambda w: w * 0 - 1, s), donate_argnums=0)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(0, state)
        state = update(state)  # may reuse the saved buffers while the save is written
        jax.block_until_ready(state)
        restored = checkpointer.restore(abstract(state))
    np.testing.assert_array_equal(restored["w"], expected)


def test_missing_checkpoint_says_where_and_what_to_do(tmp_path):
    directory = tmp_path / "runs" / "demo" / "checkpoints"
    target = {"x": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
    assert latest_step(directory) is None
    with Checkpointer(directory, async_save=False) as checkpointer:
        assert checkpointer.latest_step() is None
        with pytest.raises(FileNotFoundError, match=re.escape(str(directory)) + ".*train first"):
            checkpointer.restore(target)
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            checkpointer.restore_config()
        checkpointer.save(0, {"x": jnp.ones(2)})
        with pytest.raises(FileNotFoundError, match=re.escape("step 7") + ".*" + re.escape("steps [0]")):
            checkpointer.restore(target, step=7)
    with Checkpointer(directory, read_only=True) as reader:
        np.testing.assert_array_equal(reader.restore(target)["x"], [1, 1])
        with pytest.raises(ValueError, match="read-only"):
            reader.save(1, {"x": jnp.ones(2)}, force=True)
    assert step_folders(directory) == ["0"]


def run_writer(directory: Path, kill_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(WRITER), str(directory)] + ([] if kill_at is None else [str(kill_at)])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_a_process_killed_mid_save_leaves_no_half_written_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"

    # 1. The writer kills itself as soon as the save of step 2 has started: step 2 is half-written.
    writer = run_writer(directory, kill_at=2)
    stdout, _ = writer.communicate(timeout=120)
    assert writer.returncode == -signal.SIGKILL and stdout.split("\n")[-2] == "saving 2"
    assert [name.split(".")[0] for name in tmp_folders(directory)] == ["2"]  # what the kill left behind
    assert latest_step(directory) == 1

    # 2. A restarted writer clears that, saves step 2 again and is killed from outside, at any moment.
    writer = run_writer(directory)
    for line in writer.stdout:
        if line.strip() == "saving 3":
            break
    time.sleep(0.1)  # into step 3's write, or past it on a fast machine: either way valid
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)

    # 3. Whatever a fresh reader calls the newest checkpoint restores exactly, and saving goes on.
    with Checkpointer(directory, keep=2, every=1) as checkpointer:
        newest = checkpointer.latest_step()
        assert newest >= 2
        expected = state_at(newest)
        assert_bit_identical(checkpointer.restore(abstract(expected)), expected)
        assert checkpointer.restore_config() == config_at(newest)
        for step in (newest + 1, newest + 2):
            assert checkpointer.save(step, state_at(step))
        checkpointer.wait()
        assert checkpointer.all_steps() == [newest + 1, newest + 2]
        assert_bit_identical(checkpointer.restore(abstract(expected)), state_at(newest + 2))
    assert tmp_folders(directory) == []
