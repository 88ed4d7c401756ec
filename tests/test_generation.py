"""Pipeline.load(workdir).generate(...) and sample.py on a tiny trained run."""

import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import jaxdit
import sample as sample_script
from jaxdit import sampling
from jaxdit.checkpoint import Checkpointer
from jaxdit.config import apply_overrides, load_config
from jaxdit.pipeline import Pipeline
from jaxdit.sharding import make_mesh
from jaxdit.train_loop import train
from jaxdit.train_step import abstract_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle moving left", "a small blue square moving up"]
STEPS = 3  # denoising steps in these tests: every sampler path, few compiles


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny run (2 frames of 16x16, patch 1x4x4) with checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("run")
    config = apply_overrides(
        load_config(ROOT / "configs" / "tiny.py"), ["--train.steps", "2", "--train.checkpoint_every", "1"]
    )
    train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.load(run)


def test_load_gives_the_config_the_ema_model_and_the_codec(run, pipe):
    assert isinstance(pipe.model, jaxdit.VideoDiT) and pipe.step == 2
    assert pipe.config.name == "tiny" and pipe.codec.channels == pipe.config.model.in_channels
    checkpointer = Checkpointer(run / "checkpoints", read_only=True)
    state = checkpointer.restore(abstract_train_state(pipe.config, make_mesh(devices=jax.devices()[:1])))
    ema = jax.tree.leaves(state.ema)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pipe.denoiser), ema, strict=True))
    raw = jax.tree.leaves(state.params)
    assert not all(np.array_equal(a, b) for a, b in zip(ema, raw, strict=True))  # EMA, not the raw weights
    assert Pipeline.load(run, step=1).step == 1


def test_generate_returns_uint8_videos_with_the_samples_of_a_prompt_adjacent(pipe):
    videos = pipe.generate(PROMPTS, num_samples=2, steps=STEPS, seed=3)
    assert videos.shape == (4, 2, 16, 16, 3) and videos.dtype == np.uint8
    repeated = pipe.generate([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, steps=STEPS, seed=3)
    np.testing.assert_array_equal(videos, repeated)
    assert not np.array_equal(videos[0], videos[1])  # two samples, two noises


def test_same_seed_same_pixels_across_runs_batch_sizes_and_device_counts(run, pipe):
    reference = pipe.generate(PROMPTS, num_samples=3, steps=STEPS, seed=11)
    np.testing.assert_array_equal(reference, pipe.generate(PROMPTS, num_samples=3, steps=STEPS, seed=11))
    for batch_size in (1, 4):  # 4 runs as 8: a multiple of the 8 devices, the padding dropped
        np.testing.assert_array_equal(
            reference, pipe.generate(PROMPTS, num_samples=3, steps=STEPS, seed=11, batch_size=batch_size)
        )
    one_device = Pipeline.load(run, devices=jax.local_devices()[:1])
    np.testing.assert_array_equal(reference, one_device.generate(PROMPTS, num_samples=3, steps=STEPS, seed=11))
    assert not np.array_equal(reference, pipe.generate(PROMPTS, num_samples=3, steps=STEPS, seed=12))


def test_any_height_width_and_duration_with_a_warning_off_the_trained_size(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trained size (2x16x16): no warning
        trained = pipe.generate(PROMPTS, steps=STEPS, seed=5)
    with pytest.warns(UserWarning, match=r"1x16x32 \(frames x height x width\) is not a size this run trained on \(2x16x16\)"):
        image = pipe.generate(PROMPTS, steps=STEPS, seed=5, num_frames=1, height=16, width=32)
    with pytest.warns(UserWarning, match="4x32x16"):
        tall = pipe.generate(PROMPTS, steps=STEPS, seed=5, num_frames=4, height=32, width=16)
    assert trained.shape == (2, 2, 16, 16, 3)
    assert image.shape == (2, 1, 16, 32, 3) and tall.shape == (2, 4, 32, 16, 3)
    assert image.dtype == tall.dtype == np.uint8 and image.std() > 0 and tall.std() > 0
    with pytest.warns(UserWarning):  # the same shape as height / width or as a square size
        np.testing.assert_array_equal(tall, pipe.generate(PROMPTS, steps=STEPS, seed=5, num_frames=4, height=32, width=16))


def test_sdedit_at_strength_one_is_plain_sampling_and_near_zero_returns_the_clip(pipe):
    from jaxdit.data.shapes import ShapesDataset

    clip = ShapesDataset(num_frames=2, size=16, seed=4)[0]["video"]  # (2, 16, 16, 3) uint8
    plain = pipe.generate(PROMPTS, steps=STEPS, seed=2)
    np.testing.assert_array_equal(pipe.generate(PROMPTS, steps=STEPS, seed=2, edit=clip, strength=1.0), plain)
    kept = pipe.generate(PROMPTS, steps=STEPS, seed=2, edit=clip, strength=0.1)  # 0 of 3 steps rerun
    np.testing.assert_array_equal(kept, np.stack([clip, clip]))  # through the identity codec: exactly the clip
    edited = pipe.generate(PROMPTS, steps=STEPS, seed=2, edit=clip, strength=0.5)  # the last of 3 steps rerun
    assert edited.shape == plain.shape and not np.array_equal(edited, plain) and not np.array_equal(edited, kept)
    for kwargs, message in [
        ({"strength": 0.0}, r"strength must be in \(0, 1\]"), ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"num_frames": 4}, r"num_frames=4 differs from the clip to edit \(2\)"),
        ({"edit": clip.astype(np.float32)}, "edit must be a uint8 clip"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.generate(PROMPTS, steps=STEPS, **{"edit": clip, **kwargs})


def test_guidance_scale_one_runs_one_pass_per_step(pipe, monkeypatch):
    guided = pipe.generate(PROMPTS, steps=STEPS, cfg_scale=3.0)
    monkeypatch.setattr(sampling, "guide", lambda *args: pytest.fail("g = 1 must not run the guided pair"))
    unguided = pipe.generate(PROMPTS, steps=STEPS, cfg_scale=1.0)
    assert unguided.shape == guided.shape and not np.array_equal(unguided, guided)


def test_ddim_with_eta_one_is_ddpm_and_eta_zero_is_not(pipe):
    """With eta = 1 DDIM's mean and variance are DDPM's posterior ones (fixed variance: no learn_sigma here)."""
    ddpm = pipe.generate(PROMPTS, steps=STEPS, sampler="ddpm", seed=1)
    ddim = pipe.generate(PROMPTS, steps=STEPS, sampler="ddim", eta=1.0, seed=1)
    assert ddpm.shape == ddim.shape == (2, 2, 16, 16, 3)
    assert np.abs(ddpm.astype(int) - ddim).max() <= 1
    assert not np.array_equal(ddpm, pipe.generate(PROMPTS, steps=STEPS, sampler="ddim", eta=0.0, seed=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "rk4"}, "unknown sampler 'rk4'"),
        ({"sampler": "heun"}, "sampler 'heun' does not sample a ddpm run"),
        ({"steps": 0}, "between 1 and the 1000 training steps"),
        ({"size": 18}, "cannot make videos of 18 height: height must be a positive multiple of 4"),
        ({"width": 18}, "cannot make videos of 18 width: width must be a positive multiple of 4"),
        ({"size": 16, "height": 16}, r"give size \(a square\) or height and width, not both"),
        ({"num_frames": 0}, "cannot make videos of 0 frames"),
        ({"num_samples": 0}, "num_samples >= 1"),
        ({"image": np.zeros((16, 16, 3), np.uint8)}, "trained with no frame conditioning .* --model.frame_condition true"),
        ({"video": np.zeros((4, 16, 16, 3), np.uint8)}, "trained with no frame conditioning"),
    ],
)
def test_bad_generation_requests_are_named(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPTS, **{"steps": STEPS, **kwargs})


def test_a_too_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="prompt of 107 tokens truncated to the model's text.max_length=48"):
        videos = pipe.generate(["a large red circle moving left and " * 3], steps=STEPS)
    assert videos.shape[0] == 1


def test_load_names_a_missing_run_or_step(tmp_path, run):
    with pytest.raises(FileNotFoundError, match="no checkpoints in .*python train.py --workdir"):
        Pipeline.load(tmp_path / "nothing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Pipeline.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 .* steps \[1, 2\]"):
        Pipeline.load(run, step=7)


def test_sample_py_writes_npy_png_and_reads_a_prompts_file(run, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# shapes\na large red circle moving left\n\na small blue square moving up\n")
    out = tmp_path / "videos.npy"
    args = ["--workdir", str(run), "--prompts-file", str(prompts_file), "--num-samples", "2", "--steps", str(STEPS)]
    assert sample_script.main([*args, "--out", str(out)]) == 0
    videos = np.load(out)
    assert videos.shape == (4, 2, 16, 16, 3) and videos.dtype == np.uint8
    np.testing.assert_array_equal(videos, Pipeline.load(run).generate(PROMPTS, num_samples=2, steps=STEPS))
    assert sample_script.main([*args, "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert "wrote 4 videos" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "{tmp}/none", "--prompt", "x", "--out", "{tmp}/a.npy"], "no checkpoints in"),
        (["--prompt", "x", "--out", "{tmp}/a.avi"], "must end in one of .mp4, .gif, .png, .npy"),
        (["--out", "{tmp}/a.npy"], "give at least one --prompt"),
        (["--prompt", "x", "--out", "{tmp}/a.npy", "--sampler", "euler"], "sampler 'euler' does not sample a ddpm run"),
        (["--prompt", "x", "--out", "{tmp}/a.npy", "--size", "10"], "cannot make videos of 10 height"),
        (["--prompt", "x", "--out", "{tmp}/a.npy", "--size", "16", "--width", "32"], "give --size (a square) or --height"),
        (["--prompts-file", "{tmp}/missing.txt", "--out", "{tmp}/a.npy"], "cannot read --prompts-file"),
    ],
)
def test_sample_py_rejects_bad_requests_clearly(run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--workdir" not in args:
        args = ["--workdir", str(run), *args]
    with pytest.raises(SystemExit) as exit_info:
        sample_script.main([*args, "--steps", str(STEPS)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("a.*"))


def test_sample_py_writes_an_image_of_any_height_and_width(run, tmp_path, capsys):
    out = tmp_path / "still.npy"
    args = ["--workdir", str(run), "--prompt", PROMPTS[0], "--steps", str(STEPS), "--num-frames", "1"]
    with pytest.warns(UserWarning, match="not a size this run trained on"):
        assert sample_script.main([*args, "--height", "16", "--width", "32", "--out", str(out)]) == 0
    assert np.load(out).shape == (1, 1, 16, 32, 3)
    assert "wrote 1 videos (1, 16, 32)" in capsys.readouterr().out


def test_sample_py_edits_a_clip_with_sdedit(run, tmp_path, capsys):
    from jaxdit.data.shapes import ShapesDataset

    clip = ShapesDataset(num_frames=3, size=24, seed=4)[0]["video"]  # (3, 24, 24, 3): cut and resized below
    np.save(tmp_path / "clip.npy", clip)
    args = ["--workdir", str(run), "--prompt", PROMPTS[0], "--steps", str(STEPS), "--edit", str(tmp_path / "clip.npy"),
            "--num-frames", "2", "--size", "16", "--strength", "0.1", "--out", str(tmp_path / "kept.npy")]
    assert sample_script.main(args) == 0
    from jaxdit.data.video_folder import resize_crop

    np.testing.assert_array_equal(np.load(tmp_path / "kept.npy")[0], resize_crop(clip[:2], 16, 16))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample_script.main([*args[:7], str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "a.npy")])
    assert "cannot read --edit '" in (err := capsys.readouterr().err) and "missing.mp4': file not found" in err


def test_sample_py_end_to_end_writes_an_mp4_with_every_frame(run, tmp_path):
    import av

    out = tmp_path / "red.mp4"
    command = [
        sys.executable, str(ROOT / "sample.py"), "--workdir", str(run), "--prompt", PROMPTS[0],
        "--out", str(out), "--steps", str(STEPS), "--num-frames", "4",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sampling" in result.stderr  # the progress bar
    with av.open(str(out)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape[0] >= 16
