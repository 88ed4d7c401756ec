"""The frozen T5 text encoders (jaxdit.t5, jaxdit.frozen_text) against transformers' outputs, and a run that uses one.

The fixtures (tests/fixtures/t5/make_fixture.py) are tiny random T5 v1.1, umT5 and original-T5
checkpoints saved by transformers, with a sentencepiece tokenizer, and transformers' outputs in
float64 on a padded batch.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from jaxdit import frozen_text, t5
from jaxdit.codec import IdentityCodec
from jaxdit.config import ConfigError
from jaxdit.data.pipeline import make_dataset
from jaxdit.denoiser import Denoiser
from jaxdit.text import make_tokenizer
from jaxdit.train_step import diffusion_loss, model_graphdef

pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "t5"
MODELS = ("t5_v1_1", "umt5", "t5_relu")  # tokenizer.json + one file; tokenizer.json + sharded index; spiece.model


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "reference.npz") as data:
        return dict(data)


def _features(encoder, ids, mask) -> np.ndarray:
    graphdef, state = nnx.split(encoder)
    run = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask, bool)))


@pytest.mark.parametrize("name", MODELS)
def test_encoder_matches_transformers(name, reference):
    encoder, tokenizer = t5.load(FIXTURES / name, max_length=24)
    batch = tokenizer.encode_batch([str(c) for c in reference["captions"]])
    np.testing.assert_array_equal(batch["text_tokens"], reference["ids"])  # the library's ids, truncation included
    np.testing.assert_array_equal(batch["text_mask"], reference["mask"].astype(bool))
    np.testing.assert_array_equal(tokenizer.encode("")[0], reference["empty_ids"])

    out = _features(encoder, batch["text_tokens"], batch["text_mask"])  # (6, 24, 32)
    valid = reference["mask"].astype(bool)
    want = reference[f"{name}_out"]
    scale = np.abs(want[valid]).max()
    np.testing.assert_allclose(out[valid], want[valid], rtol=1e-5, atol=1e-5 * scale)
    assert not out[~valid].any()  # padding never reaches the DiT


def test_a_swapped_weight_is_caught(reference):
    """The parity check can fail: T5 v1.1 with layer 1's query and key weights swapped misses the reference."""
    encoder, _ = t5.load(FIXTURES / "t5_v1_1", max_length=24)
    tensors = t5.read_weights(FIXTURES / "t5_v1_1")
    q, k = "encoder.block.1.layer.0.SelfAttention.q.weight", "encoder.block.1.layer.0.SelfAttention.k.weight"
    tensors[q], tensors[k] = tensors[k], tensors[q]
    nnx.update(encoder, t5.convert(tensors, encoder))
    out = _features(encoder, reference["ids"], reference["mask"])
    valid = reference["mask"].astype(bool)
    assert np.abs(out[valid] - reference["t5_v1_1_out"][valid]).max() > 1e-2


def test_relative_buckets_follow_t5():
    """Exact offsets near the query, logarithmic bins further out, the last bin past max_distance; keys after the
    query in the upper half."""
    buckets = t5.relative_buckets(200, num_buckets=32, max_distance=128)
    before, after = buckets[100, 100 - np.arange(100)], buckets[100, 100 + np.arange(100)]
    np.testing.assert_array_equal(before[:8], np.arange(8))  # offsets 0..7 exactly
    np.testing.assert_array_equal(after[1:8], 16 + np.arange(1, 8))
    assert before[99] == 15 and after[99] == 31  # beyond max_distance: the last bin of each half
    assert np.all(np.diff(before) >= 0)


def _copy(tmp_path, name="t5_v1_1") -> pathlib.Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _edit_config(folder: pathlib.Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no T5 checkpoint folder"):
        t5.load(tmp_path / "nowhere")

    folder = _copy(tmp_path, "t5_relu")
    (folder / "spiece.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
        t5.load(folder)

    folder = _copy(tmp_path)
    _edit_config(folder, architectures=["BertModel"])
    with pytest.raises(ValueError, match="describes a BertModel .*, not a T5 encoder"):
        t5.load(folder)

    _edit_config(folder, architectures=["T5EncoderModel"], vocab_size=400)
    with pytest.raises(ValueError, match="has 40 tokens but the weights embed 400"):
        t5.load(folder)

    _edit_config(folder, vocab_size=40, d_ff=48)  # weights of another size than config.json says
    with pytest.raises(ValueError, match=r"mis-shaped encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight"):
        t5.load(folder)


def test_umt5_is_told_by_its_model_type(tmp_path, reference):
    """Hub umT5 configs predate transformers' UMT5 classes and name T5ForConditionalGeneration: model_type decides."""
    folder = _copy(tmp_path, "umt5")
    _edit_config(folder, architectures=["T5ForConditionalGeneration"])
    encoder, _ = t5.load(folder)
    assert encoder.spec.bias_per_layer
    out = _features(encoder, reference["ids"], reference["mask"])
    valid = reference["mask"].astype(bool)
    np.testing.assert_allclose(out[valid], reference["umt5_out"][valid], rtol=1e-5, atol=1e-5)
    from jaxdit.convert.t5 import convert

    encoder_only = convert(folder, tmp_path / "encoder", dtype="float32")  # and the converter names it so
    assert json.loads((encoder_only / "config.json").read_text())["architectures"] == ["UMT5EncoderModel"]


def test_missing_and_extra_tensors_are_named():
    encoder, _ = t5.load(FIXTURES / "umt5")
    tensors = t5.read_weights(FIXTURES / "umt5")
    del tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]  # umT5: one per layer
    tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(ValueError, match=r"missing encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias"
                                         r"\.weight; unexpected encoder\.block\.2\.layer\.0\.layer_norm\.weight"):
        t5.convert(tensors, encoder)


def test_bfloat16_weights_and_features(reference):
    encoder, _ = t5.load(FIXTURES / "t5_v1_1", max_length=24, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(encoder, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    out = _features(encoder, reference["ids"], reference["mask"])
    assert out.dtype == jnp.bfloat16
    valid = reference["mask"].astype(bool)
    want = reference["t5_v1_1_out"][valid]
    error = np.abs(out[valid].astype(np.float32) - want) / np.abs(want).max()
    assert 1e-4 < error.max() < 0.1 and error.mean() < 1e-2  # bfloat16's rounding (of random weights), no more
    assert frozen_text.dtype(jaxdit.TextConfig()) == jnp.float32  # "auto" on this CPU


def test_parameters_are_split_over_fsdp(monkeypatch):
    """T5-XXL's 4.7B parameters cannot sit whole on every device beside the DiT: they shard like the DiT's."""
    from jaxdit import sharding

    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 1024)  # the fixture's matrices count as large
    config = _run_config(FIXTURES / "t5_v1_1")
    _, state = frozen_text.load(config, sharding.make_mesh(fsdp=8))
    kernel = state["blocks"][0]["mlp"]["wi_0"]["kernel"]  # (32, 64)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (32, 8)
    np.testing.assert_array_equal(
        np.asarray(kernel),
        t5.read_weights(FIXTURES / "t5_v1_1")["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].T,
    )


def test_convert_cuts_out_the_encoder(tmp_path, reference):
    """T5ForConditionalGeneration -> an encoder-only folder (sharded here) that loads to the same features."""
    from jaxdit.convert.t5 import convert, main

    out = convert(FIXTURES / "t5_relu", tmp_path / "encoder", dtype="float32", shard_bytes=40_000)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    index = json.loads((out / t5.INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) > 1 and not any(key.startswith("decoder.") for key in index)
    encoder, tokenizer = t5.load(out, max_length=24)
    out_features = _features(encoder, reference["ids"], reference["mask"])
    valid = reference["mask"].astype(bool)
    np.testing.assert_allclose(out_features[valid], reference["t5_relu_out"][valid], rtol=1e-5, atol=1e-5)

    broken = _copy(tmp_path)
    _edit_config(broken, num_layers=3)
    with pytest.raises(SystemExit, match=r"missing encoder\.block\.2\."):
        main([str(broken), "--out", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()  # checked before anything is written


def test_convert_takes_the_tokenizer_from_its_own_folder(tmp_path):
    """A diffusers pipeline's text_encoder/ holds no tokenizer; its sibling tokenizer/ does."""
    from jaxdit.convert.t5 import main

    weights, tokenizer = tmp_path / "text_encoder", tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "umt5", weights)
    tokenizer.mkdir()
    (weights / "tokenizer.json").rename(tokenizer / "tokenizer.json")
    with pytest.raises(SystemExit, match="no tokenizer.json or spiece.model"):
        main([str(weights), "--out", str(tmp_path / "nothing")])
    main([str(weights), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "encoder")])
    assert (tmp_path / "encoder" / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    t5.T5Tokenizer(tmp_path / "encoder", max_length=8)  # a text.path on its own


# ----------------------------------------------------------------------------------------------------------------
# A run with a frozen T5: 2 frames of 16x16 moving shapes, a 2-block DiT.

def _run_config(path, **text) -> jaxdit.Config:
    base = jaxdit.load_config(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
    config = dataclasses.replace(
        base,
        text=jaxdit.TextConfig(encoder="t5", path=str(path), max_length=24, **text),
        train=dataclasses.replace(base.train, steps=2, checkpoint_every=1),
        sample=jaxdit.SampleConfig(prompts=(), steps=2, every=0, judge_prompts=0),  # sampled by the Pipeline
    )
    return frozen_text.resolve(config)


def test_the_encoder_is_frozen_and_sets_text_dim():
    config = _run_config(FIXTURES / "t5_v1_1")
    assert config.model.text_dim == 32 and config.text.path == str((FIXTURES / "t5_v1_1").absolute())
    graphdef, state = frozen_text.load(config)
    model = nnx.merge(model_graphdef(config), nnx.state(Denoiser(config, rngs=nnx.Rngs(0))))
    assert model.text_encoder is None  # the trained model holds no text encoder: the T5 is not optimised
    batch = {"video": np.zeros((2, 2, 16, 16, 3), np.uint8), **t5.T5Tokenizer(config.text.path, max_length=24)
             .encode_batch(["a large red circle moving left", ""])}

    def loss(text_state):
        encoder = nnx.merge(graphdef, text_state)
        return diffusion_loss(model, batch, jax.random.key(0), config=config, codec=IdentityCodec(),
                              text_encoder=encoder)[0]

    # Traced, not compiled: every gradient with respect to the encoder is the literal zero broadcast
    # (stop_gradient); without it each would be computed through the DiT's backward pass.
    jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
    produced = {id(eqn.outvars[0]): eqn for eqn in jaxpr.eqns}
    for var in jaxpr.outvars:
        eqn = produced[id(var)]
        source = eqn.invars[0]
        assert eqn.primitive.name == "broadcast_in_dim" and hasattr(source, "val") and source.val == 0, eqn
    assert len(jaxpr.outvars) == len(jax.tree.leaves(state)) > 0


def test_train_sample_resume_with_t5(tmp_path):
    """Trains 2 steps with the T5 fixture, generates with Pipeline, and refuses a changed encoder on resume."""
    from jaxdit.train_loop import train

    folder = _copy(tmp_path)
    config = _run_config(folder)
    loaded = []  # the encoder's arrays that the step and the sampler were given
    load = frozen_text.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frozen_text, "load", lambda *args: loaded.append(load(*args)) or loaded[-1])
        workdir = tmp_path / "run"
        metrics = train(config, workdir)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert json.loads((workdir / frozen_text.RUN_RECORD).read_text())["config"]["model_type"] == "t5"

    pipe = jaxdit.Pipeline.load(workdir)
    assert pipe.denoiser.text_encoder is None and pipe.config.model.text_dim == 32
    assert isinstance(pipe.text_encoder, t5.T5Encoder)
    prompts = ["a large red circle moving left", "a small blue square moving up"]
    videos = pipe.generate(prompts, steps=2, cfg_scale=4.0, seed=0)
    assert videos.shape == (2, 2, 16, 16, 3) and videos.dtype == np.uint8
    # The same input: only the prompt, through the T5, differs (after 2 steps the pixels may not show it yet).
    text = make_tokenizer(pipe.config.text).encode_batch(prompts)  # text_tokens, text_mask (2, L)
    features = pipe.text_encoder(text["text_tokens"], text["text_mask"])  # (2, L, E)
    x = np.broadcast_to(np.random.default_rng(0).normal(size=(1, 2, 16, 16, 3)), (2, 2, 16, 16, 3))
    out = np.asarray(pipe.model(x, np.array([500, 500]), text=features, text_mask=text["text_mask"]))
    assert np.abs(out[0] - out[1]).max() > 1e-6

    (_, state), = loaded
    weights = t5.read_weights(folder)
    kernel = state["blocks"][0]["attn"]["q"]["kernel"]
    assert not kernel.is_deleted()  # never donated
    np.testing.assert_array_equal(np.asarray(kernel), weights["encoder.block.0.layer.0.SelfAttention.q.weight"].T)

    tensors = t5.read_weights(folder)  # the folder's weights change under the run
    tensors["encoder.final_layer_norm.weight"] = tensors["encoder.final_layer_norm.weight"] * 2
    from safetensors.numpy import save_file

    save_file(tensors, folder / t5.WEIGHTS_FILE)
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    with pytest.raises(ConfigError, match="text encoder .* is not the one the run in .* used .*its weights changed"):
        train(longer, workdir)
    with pytest.raises(ConfigError, match="weights changed"):
        jaxdit.Pipeline.load(workdir)

    moved = tmp_path / "moved"
    shutil.copytree(FIXTURES / "t5_v1_1", moved)  # the original weights, somewhere else
    shutil.rmtree(folder)
    with pytest.raises(ConfigError, match="no T5 checkpoint folder .* give its folder's new place"):
        jaxdit.Pipeline.load(workdir)
    assert jaxdit.Pipeline.load(workdir, text_path=str(moved)).config.text.path == str(moved)


def test_a_cache_of_t5_features_gives_the_batches_of_live_encoding(tmp_path):
    from jaxdit.data.latent_cache import write_cache

    config = _run_config(FIXTURES / "t5_relu")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, caption_dropout=0.5))
    cache = write_cache(config, tmp_path / "cache", num_clips=16, shard_size=8, batch_size=4)
    cached_config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, source="cache", cache=str(cache))
    )
    from jaxdit.data.shapes import ShapesDataset

    d = config.data
    source = ShapesDataset(num_frames=d.num_frames, size=d.size, seed=d.seed, max_objects=d.max_objects, length=16)
    live = next(iter(make_dataset(config, global_batch_size=16, num_epochs=1, source=source)))
    cached = next(iter(make_dataset(cached_config, global_batch_size=16, num_epochs=1)))
    np.testing.assert_array_equal(cached["text_tokens"], live["text_tokens"])  # the same captions dropped
    np.testing.assert_array_equal(cached["text_mask"], live["text_mask"])
    dropped = live["text_mask"].sum(axis=1) == 1  # "" is just </s>
    assert 0 < dropped.sum() < 16

    graphdef, state = frozen_text.load(config)
    features = _features(nnx.merge(graphdef, state), live["text_tokens"], live["text_mask"])  # (16, L, E)
    assert cached["text_features"].dtype == jnp.bfloat16
    np.testing.assert_allclose(cached["text_features"].astype(np.float32), features, rtol=2**-7, atol=1e-6)

    with pytest.raises(ConfigError, match="holds the features of a frozen t5 text encoder but this config trains a byte"):
        make_dataset(dataclasses.replace(cached_config, text=jaxdit.TextConfig(max_length=24)), global_batch_size=16)
