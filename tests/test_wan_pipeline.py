"""A diffusers Wan 2.1 T2V folder converted to a jaxdit run (`python -m jaxdit.convert.wan`) generates diffusers'
video: the tiny WanPipeline of tests/fixtures/wan_pipeline (transformer, VAE, umT5 and tokenizer, UniPC), from
the same initial latents, with guidance and a negative prompt."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdit.convert import wan
from jaxdit.pipeline import Pipeline

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_pipeline"

STEPS, GUIDANCE, FRAMES, HEIGHT, WIDTH, TEXT_LENGTH = 6, 5.0, 5, 32, 48, 24  # as make_fixture.py


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def source(wan_tiny_source):
    return wan_tiny_source


@pytest.fixture(scope="module")
def run(wan_tiny_run):
    return wan_tiny_run  # converted with --text-length TEXT_LENGTH


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.load(run)


def generate(pipe, reference, **kwargs):
    latents = np.transpose(reference["latents"], (0, 2, 3, 4, 1))  # diffusers' (B, C, T, H, W) -> channels last
    return pipe.generate(
        [str(p) for p in reference["prompts"]], negative_prompt=str(reference["negative_prompt"]), latents=latents,
        steps=STEPS, cfg_scale=GUIDANCE, num_frames=FRAMES, height=HEIGHT, width=WIDTH, **kwargs,
    )


def test_the_converted_run_generates_wanpipelines_video(pipe, reference):
    video = generate(pipe, reference, pixels="float")  # (B, T, H, W, 3) in [0, 1], as diffusers' output_type="np"
    assert video.dtype == np.float32 and video.shape == reference["video"].shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(video - reference["video"]).max() < 1e-4  # measured 9.4e-6
    frames = generate(pipe, reference)  # the default uint8 frames of the same videos
    assert frames.dtype == np.uint8 and np.abs(frames / 255 - reference["video"]).max() <= 0.5 / 255 + 1e-4


def test_the_run_is_wans_pipeline(run, pipe, source):
    config = pipe.config
    assert pipe.step == 0 and config.model.variant == "24x2x2/1x2x2" and config.model.text_padding == "attended"
    assert (config.diffusion.process, config.diffusion.prediction, config.diffusion.shift) == ("flow", "v", 3.0)
    assert (config.sample.sampler, config.sample.steps, config.sample.cfg_scale, config.sample.fps) == ("unipc", 50, 5.0, 16)
    assert config.data.shapes[0] == (81, 480, 832) and config.text.max_length == TEXT_LENGTH
    assert config.text.path == str(run / wan.TEXT_DIR) and config.model.text_dim == 32
    assert sorted(p.name for p in (run / wan.TEXT_DIR).iterdir()) == [
        "config.json", "converted.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    record = json.loads((run / "imported.json").read_text())
    hashed = {name.split("/")[0] for name in record["source_sha256"]}
    assert hashed == set(wan.PARTS) and record["parameters"] == 21_000
    assert len([n for n in record["source_sha256"] if n.startswith("transformer/")]) == 5  # 3 shards, index, config
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        wan.convert(source, run)


def test_a_bfloat16_conversion_stores_bfloat16(source, reference, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    run = wan.convert(source, tmp_path / "wan_bf16", dtype="bfloat16", text_length=TEXT_LENGTH)
    stored = ocp.StandardCheckpointer().metadata(run / "checkpoints" / "0" / "state").item_metadata["ema"]
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(stored)} == {"bfloat16"}
    assert json.loads((run / wan.TEXT_DIR / "config.json").read_text())["dtype"] == "bfloat16"
    video = generate(Pipeline.load(run), reference, pixels="float")  # the weights read back into float32
    assert np.abs(video - reference["video"]).mean() < 0.02  # measured 0.0038 (largest 0.14) on this random model


def test_the_converted_checkpoint_verifies_in_pieces(run, monkeypatch):
    from jaxdit.checkpoint import __main__ as checkpoint_cli
    from jaxdit.checkpoint import verify

    monkeypatch.setattr(verify, "READ_BYTES", 4096)  # read back a few arrays at a time
    lines, status = checkpoint_cli.verify(run)  # an import holds weights only: no optimizer state is missing
    assert status == 0 and "reads completely" in lines[1] and lines[-1].endswith("sampling starts there")


def test_sample_py_generates_from_the_converted_run(run, tmp_path):
    import sample

    out = tmp_path / "video.npy"
    sample.main(["--workdir", str(run), "--prompt", "a red circle", "--negative-prompt", "a blue square",
                 "--num-frames", "5", "--height", "32", "--width", "48", "--sampler", "unipc", "--steps", "2",
                 "--out", str(out)])
    assert np.load(out).shape == (1, 5, 32, 48, 3)


def test_the_starting_noise_must_fit(pipe, reference):
    with pytest.raises(ValueError, match=r"one latent video per sample.*\(2, 2, 4, 6, 4\)"):
        generate(pipe, {**reference, "latents": reference["latents"][:, :, :1]})
    with pytest.raises(ValueError, match="pixels"):
        generate(pipe, reference, pixels="float16")


def _edit_shard(folder: pathlib.Path, key: str, **changes) -> None:
    """In the shard that holds `key`: drops it, or sets the tensors `changes` (new keys included)."""
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][key]
    tensors = load_file(path)
    if not changes:
        del tensors[key]
    save_file({**tensors, **changes}, path, metadata={"format": "pt"})


def test_the_converter_names_every_tensor_that_does_not_fit(source, tmp_path):
    broken = pathlib.Path(shutil.copytree(source, tmp_path / "broken"))
    _edit_shard(broken / "transformer", "blocks.0.attn1.norm_k.weight")  # missing
    misshaped = {"blocks.1.ffn.net.2.weight": np.zeros((24, 41), np.float32)}
    _edit_shard(broken / "transformer", "blocks.1.ffn.net.2.weight", **misshaped)
    extra = {"blocks.2.attn1.to_q.weight": np.zeros((24, 24), np.float32)}  # a third block
    _edit_shard(broken / "transformer", "blocks.1.attn1.to_q.weight", **extra)
    with pytest.raises(ValueError) as error:
        wan.convert(broken, tmp_path / "run")
    message = str(error.value)
    assert "lacks 1 tensors: blocks.0.attn1.norm_k.weight" in message
    assert "1 tensors it does not expect: blocks.2.attn1.to_q.weight" in message
    assert "1 tensors of another shape: blocks.1.ffn.net.2.weight (24, 41) (expected (24, 40))" in message
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_converter_names_a_missing_part_or_shard(source, tmp_path):
    broken = pathlib.Path(shutil.copytree(source, tmp_path / "broken"))
    next((broken / "transformer").glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00003.safetensors is not in"):
        wan.convert(broken, tmp_path / "run")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match="has no tokenizer/"):
        wan.convert(broken, tmp_path / "run")
    (broken / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        wan.convert(broken, tmp_path / "run")
