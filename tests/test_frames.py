"""Frame conditioning (jaxdit.frames): the training masks and loss, the sampler's resets, and prompting a
trained run with images and clips through Pipeline and sample.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sample as sample_script
from jaxdit import diffusion, flow, frames, sampling
from jaxdit.config import Config, ConfigError, apply_overrides, load_config
from jaxdit.model import VideoDiT
from jaxdit.pipeline import Pipeline
from jaxdit.train_loop import train
from jaxdit.train_step import diffusion_loss
from tests.helpers import inputs, randomized, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle moving left", "a small blue square moving up"]
STEPS = 3
KINDS = {name: i for i, name in enumerate(frames.CONDITIONS)}


# --- the condition kinds and their masks ---------------------------------------------------------------


def test_parse_condition_gives_text_the_rest_and_names_bad_entries():
    assert frames.parse_condition("first=0.3, last=0.1") == pytest.approx(
        {"text": 0.6, "first": 0.3, "last": 0.1, "first_last": 0.0, "lead": 0.0, "trail": 0.0}
    )
    assert frames.parse_condition("")["text"] == 1.0
    for bad, message in [("middle=0.2", "kind=probability pairs of first, last"), ("first=a", "must be a number"),
                         ("first=0.8,last=0.3", "add up to at most 1"), ("first", "kind=probability")]:
        with pytest.raises(ValueError, match=message):
            frames.parse_condition(bad)


def test_masks_in_closed_form():
    kinds = jnp.asarray([KINDS[name] for name in frames.CONDITIONS])
    got = np.asarray(frames.masks(kinds, 5, clip_frames=2)).astype(int)
    expected = np.array([
        [0, 0, 0, 0, 0],  # text
        [1, 0, 0, 0, 0],  # first
        [0, 0, 0, 0, 1],  # last
        [1, 0, 0, 0, 1],  # first and last
        [1, 1, 0, 0, 0],  # a leading clip of 2
        [0, 0, 0, 1, 1],  # a trailing clip of 2
    ])
    np.testing.assert_array_equal(got, expected)
    assert not np.asarray(frames.masks(kinds, 1, 2)).any()  # an image has no frame to give
    assert np.asarray(frames.masks(kinds, 2, 5)).sum(axis=1).max() == 1  # a clip of k leaves one frame generated


def test_draw_masks_follows_the_probabilities():
    probabilities = frames.parse_condition("first=0.5,trail=0.25")
    kinds, masks = frames.draw_masks(jax.random.key(0), 4000, 4, probabilities, 2)
    share = np.bincount(np.asarray(kinds), minlength=len(frames.CONDITIONS)) / 4000
    np.testing.assert_allclose(share, [0.25, 0.5, 0, 0, 0, 0.25], atol=0.03)
    np.testing.assert_array_equal(masks, frames.masks(kinds, 4, 2))


# --- the model and the loss ------------------------------------------------------------------------------


def test_the_condition_embedding_starts_at_zero_and_then_reads_the_given_frames():
    config = tiny_config(variant="tiny/2x2x2", frame_condition=True)
    model = VideoDiT(config, rngs=nnx.Rngs(0))
    x, t, conditions = inputs(config, frames=4)
    given, mask = x[::-1] * 0.5, jnp.asarray([[True, False, False, False], [False, False, True, True]])
    # Zero-initialised: with or without given frames, the same prediction as the same model without the layer.
    plain = VideoDiT(tiny_config(variant="tiny/2x2x2"), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model(x, t, given=given, given_mask=mask), plain(x, t))
    model = randomized(model)
    text_only = model(x, t)
    np.testing.assert_array_equal(text_only, model(x, t, given=given, given_mask=jnp.zeros_like(mask)))
    assert not np.allclose(text_only, model(x, t, given=given, given_mask=mask))
    with pytest.raises(ValueError, match="takes both given"):
        model(x, t, given=given)
    with pytest.raises(ValueError, match="no frame conditioning"):
        plain(x, t, given=given, given_mask=mask)


@pytest.mark.parametrize("process", ["flow", "ddpm"])
def test_masked_loss_is_the_mean_over_generated_frames_with_zero_gradient_on_given_ones(process):
    key = jax.random.split(jax.random.key(1), 4)
    x0, noise, out = (jax.random.normal(k, (2, 4, 2, 2, 3)) for k in key[:3])
    keep = jnp.asarray([[False, True, True, True], [True, True, False, False]])
    if process == "flow":
        t = jnp.asarray([0.3, 0.7])
        loss = lambda out: flow.loss(out, x0, flow.interpolate(x0, noise, t), noise, t, prediction="v", keep=keep)[0]
        error = (out - flow.target(x0, noise)) ** 2
    else:
        schedule, t = diffusion.make_schedule("linear", 100), jnp.asarray([3, 60])
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        loss = lambda out: diffusion.loss(schedule, out, x0, x_t, noise, t, prediction="epsilon", keep=keep)[0]
        error = (out - noise) ** 2
    per_frame = np.asarray(error).mean(axis=(2, 3, 4))  # (B, T)
    expected = [per_frame[b][np.asarray(keep[b])].mean() for b in range(2)]
    np.testing.assert_allclose(loss(out), expected, rtol=1e-6)
    grad = np.asarray(jax.grad(lambda out: loss(out).sum())(out))
    assert (grad[~np.asarray(keep)] == 0).all() and (grad[np.asarray(keep)] != 0).all()


class _Recorder(nnx.Module, pytree=False):
    """Stands in for the Denoiser in diffusion_loss: keeps what it was given, predicts zeros."""

    def __init__(self):
        self.rngs = nnx.Rngs(dropout=0)
        self.seen = {}

    def __call__(self, x_t, t, **kwargs):
        self.seen = {"x_t": x_t, **kwargs}
        return jnp.zeros_like(x_t)


def test_conditioned_training_keeps_given_frames_clean_and_out_of_the_loss():
    config = apply_overrides(load_config(ROOT / "configs" / "shapes_tiny.py"), [
        "--train.condition", "first=0.25,last=0.25,lead=0.25,trail=0.25",  # never text only
    ])
    from jaxdit.codec import make_codec
    from jaxdit.data.shapes import ShapesDataset

    data = ShapesDataset(num_frames=8, size=32, seed=0)
    batch = {"video": np.stack([data[i]["video"] for i in range(6)])}
    model = _Recorder()
    loss, _ = diffusion_loss(model, batch, jax.random.key(3), config=config, codec=make_codec(config.codec))
    x0 = make_codec(config.codec).encode(batch["video"])
    x_t, given, mask = model.seen["x_t"], model.seen["given"], np.asarray(model.seen["given_mask"])
    assert mask.any(axis=1).all() and not mask.all(axis=1).any()
    np.testing.assert_array_equal(np.asarray(x_t)[mask], np.asarray(x0)[mask])  # bitwise the clean frames
    np.testing.assert_array_equal(np.asarray(given)[mask], np.asarray(x0)[mask])
    assert not np.allclose(np.asarray(x_t)[~mask], np.asarray(x0)[~mask])
    assert np.isfinite(loss)


def test_an_image_in_a_two_frame_patch_is_a_still_clip_with_nothing_given():
    config = load_config(ROOT / "configs" / "shapes_tiny.py")
    from jaxdit.codec import make_codec
    from jaxdit.data.shapes import ShapesDataset

    still = ShapesDataset(num_frames=1, size=32, seed=0)
    batch = {"video": np.stack([still[i]["video"] for i in range(4)])}  # (4, 1, 32, 32, 3)
    model = _Recorder()
    diffusion_loss(model, batch, jax.random.key(0), config=config, codec=make_codec(config.codec))
    assert model.seen["x_t"].shape == (4, 2, 32, 32, 3)  # padded to the temporal patch
    assert not np.asarray(model.seen["given_mask"]).any()


class _CausalCodec:
    """A causal 2x-in-time codec of one channel: latent 0 is pixel frame 0, latent j is frame 2j plus half of 2j - 1."""

    factors = (2, 1, 1)

    def encode(self, video):
        video = jnp.asarray(video, jnp.float32)[..., :1]  # (B, F, H, W, 1)
        rest = video[:, 2::2] + 0.5 * video[:, 1::2]
        return jnp.concatenate([video[:, :1], rest], axis=1)  # (B, 1 + (F - 1) / 2, H, W, 1)


def test_with_a_causal_codec_the_last_frames_are_encoded_on_their_own():
    codec = _CausalCodec()
    video = jax.random.uniform(jax.random.key(0), (4, 7, 2, 2, 3))  # 7 frames -> 4 latent frames
    latents = codec.encode(video)
    kinds = jnp.asarray([KINDS["first"], KINDS["last"], KINDS["trail"], KINDS["first_last"]])
    references = np.asarray(frames.reference_latents(codec, video, latents, kinds, clip_frames=2))
    np.testing.assert_array_equal(references[0], latents[0])  # a leading reference is the clip's causal head
    np.testing.assert_array_equal(references[1, -1:], codec.encode(video[1:2, -1:])[0])  # the last frame alone
    np.testing.assert_array_equal(references[3, -1:], codec.encode(video[3:4, -1:])[0])
    np.testing.assert_array_equal(references[2, -2:], codec.encode(video[2:3, -3:])[0])  # 3 pixels -> 2 latents
    assert not np.allclose(references[1, -1:], latents[1, -1:])  # not the clip's own last latent frame
    np.testing.assert_array_equal(frames.reference_latents(_IdentityTime(), video, latents, kinds, 2), latents)


class _IdentityTime:
    factors = (1, 1, 1)


def test_config_names_a_condition_without_the_model_input_and_the_reverse():
    config = load_config(ROOT / "configs" / "tiny.py")
    with pytest.raises(ValueError, match="needs model.frame_condition=True"):
        apply_overrides(config, ["--train.condition", "first=0.5"])
    with pytest.raises(ValueError, match="needs train.condition"):
        apply_overrides(config, ["--model.frame_condition", "true"])
    assert isinstance(config, Config)


# --- the samplers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "heun", "unipc", "ddim", "ddpm"])
def test_every_sampler_keeps_the_given_frames_after_every_step(sampler):
    shape = (4, 2, 2, 3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    given = jax.random.normal(jax.random.key(5), (2, *shape))
    mask = jnp.asarray([[True, False, False, True], [True, True, False, False]])
    seen = []

    def denoise(x, t):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), x)
        return jnp.sin(3 * x) + 0.01 * t.reshape(-1, 1, 1, 1, 1)

    if sampler in ("euler", "heun", "unipc"):
        run = lambda: sampling.sample_flow(denoise, keys, shape, steps=4, sampler=sampler, prediction="v",
                                           given=(given, mask))
    else:
        run = lambda: sampling.sample(denoise, keys, shape, schedule_kind="linear", num_train_steps=100, steps=4,
                                      sampler=sampler, eta=1.0, given=(given, mask))
    x0 = jax.jit(run)()
    jax.effects_barrier()
    assert len(seen) >= 4
    for x in [*seen, np.asarray(x0)]:
        np.testing.assert_array_equal(x[np.asarray(mask)], np.asarray(given)[np.asarray(mask)])
    assert not np.allclose(np.asarray(x0)[~np.asarray(mask)], np.asarray(given)[~np.asarray(mask)])


# --- a trained run, prompted with images and clips ----------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step flow run of 4-frame clips (patch 2x4x4) and stills, trained with every kind of given frames."""
    workdir = tmp_path_factory.mktemp("frames_run")
    config = apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [
        "--train.steps", "2", "--model.variant", "tiny/2x4x4", "--diffusion.process", "flow",
        "--data.buckets", "4x16x16;1x16x16", "--model.frame_condition", "true",
        "--train.condition", "first=0.2,last=0.2,first_last=0.2,lead=0.1,trail=0.1", "--train.condition_frames", "2",
    ])
    train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.load(run)


def _clip(seed: int, frames: int = 4) -> np.ndarray:
    from jaxdit.data.shapes import ShapesDataset

    return ShapesDataset(num_frames=frames, size=16, seed=seed)[0]["video"]  # (T, 16, 16, 3) uint8


def test_image_to_video_keeps_the_image_as_the_first_frame(pipe):
    image = _clip(1)[0]
    videos = pipe.generate(PROMPTS, image=image, steps=STEPS, seed=0)  # (2, 4, 16, 16, 3)
    assert videos.shape == (2, 4, 16, 16, 3)
    np.testing.assert_array_equal(videos[:, 0], np.stack([image, image]))  # through the identity codec: exactly
    plain = pipe.generate(PROMPTS, steps=STEPS, seed=0)
    assert not np.array_equal(videos[:, 1:], plain[:, 1:])


def test_last_image_both_images_and_a_loop(pipe):
    first, last = _clip(1)[0], _clip(2)[0]
    ending = pipe.generate(PROMPTS, last_image=last, steps=STEPS)
    np.testing.assert_array_equal(ending[:, -1], np.stack([last, last]))
    bridge = pipe.generate(PROMPTS, image=first, last_image=last, steps=STEPS, sampler="heun")
    np.testing.assert_array_equal(bridge[:, 0], np.stack([first, first]))
    np.testing.assert_array_equal(bridge[:, -1], np.stack([last, last]))
    loop = pipe.generate(PROMPTS[0], image=first, last_image=first, steps=STEPS)
    np.testing.assert_array_equal(loop[0, 0], loop[0, -1])


def test_a_video_continued_forward_and_backward(pipe):
    clip = _clip(3, frames=6)
    forward = pipe.generate(PROMPTS, video=clip, steps=STEPS)  # its last 2 frames lead
    np.testing.assert_array_equal(forward[:, :2], np.stack([clip[-2:]] * 2))
    backward = pipe.generate(PROMPTS, video=clip, backward=True, steps=STEPS)  # its first 2 frames end
    np.testing.assert_array_equal(backward[:, -2:], np.stack([clip[:2]] * 2))
    with pytest.warns(UserWarning, match="4x16x32 .frames x height x width. is not a size this run trained on"):
        landscape = pipe.generate(PROMPTS[0], video=np.concatenate([clip, clip], axis=2), steps=STEPS)
    assert landscape.shape == (1, 4, 16, 32, 3)  # the clip's size, an untrained one (warned)


def test_still_images_are_sampled_through_a_padded_patch(pipe):
    images = pipe.generate(PROMPTS, num_frames=1, steps=STEPS)
    assert images.shape == (2, 1, 16, 16, 3) and images.std() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"image": np.zeros((8, 8, 3), np.uint8), "height": 16}, r"image is 8x8 pixels, but the videos asked for are 16x"),
    ({"image": np.zeros((16, 16, 3), np.float32)}, "image must be a uint8 image"),
    ({"image": np.zeros((16, 16, 3), np.uint8), "num_frames": 1}, "an image .one frame. cannot be prompted"),
    ({"video": np.zeros((1, 16, 16, 3), np.uint8)}, "gives 1 frames, but this run continues clips from 2"),
    ({"video": np.zeros((4, 16, 16, 3), np.uint8), "image": np.zeros((16, 16, 3), np.uint8)}, "drop image="),
    ({"backward": True}, "give it as video="),
    ({"image": np.zeros((16, 16, 3), np.uint8), "edit": np.zeros((4, 16, 16, 3), np.uint8)}, "not both"),
    ({"image": np.zeros((16, 16, 3), np.uint8), "last_image": np.zeros((16, 16, 3), np.uint8), "num_frames": 2},
     "fill 2 of the 2 latent frames"),
])
@pytest.mark.filterwarnings("ignore:2x16x16")  # the untrained size of the last case
def test_bad_references_are_named(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPTS, steps=STEPS, **kwargs)


def test_sample_py_prompts_with_an_image_and_a_video(run, tmp_path, capsys):
    from PIL import Image

    image = _clip(1)[0]
    Image.fromarray(image).save(tmp_path / "first.png")
    out = tmp_path / "i2v.npy"
    assert sample_script.main([
        "--workdir", str(run), "--prompt", PROMPTS[0], "--image", str(tmp_path / "first.png"), "--steps", str(STEPS),
        "--out", str(out),
    ]) == 0
    videos = np.load(out)
    np.testing.assert_array_equal(videos[0, 0], image)
    back = tmp_path / "back.npy"
    assert sample_script.main([
        "--workdir", str(run), "--prompt", PROMPTS[0], "--video", str(out), "--backward", "--steps", str(STEPS),
        "--out", str(back),
    ]) == 0
    np.testing.assert_array_equal(np.load(back)[0, -2:], videos[0, :2])
    for argv, message in [(["--image", str(tmp_path / "missing.png")], "cannot read --image"),
                          (["--backward"], "--backward generates what came before a clip")]:
        with pytest.raises(SystemExit):
            sample_script.main(["--workdir", str(run), "--prompt", "a", "--out", str(back), *argv])
        assert message in capsys.readouterr().err


def test_a_latent_cache_cannot_give_last_frames_of_a_causal_codec():
    from jaxdit.train_loop import check_config

    class Causal:  # what check_config reads of a codec
        factors, channels = (2, 4, 4), 3

        def latent_shape(self, shape):
            return (1 + (shape[0] - 1) // 2, shape[1] // 4, shape[2] // 4, 3)

    config = apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [
        "--model.frame_condition", "true", "--train.condition", "last=0.5", "--data.source", "cache",
        "--data.cache", "/nonexistent", "--model.variant", "tiny/1x1x1",
    ])
    from jaxdit.data.buckets import Bucket
    from jaxdit.sharding import make_mesh

    with pytest.raises(ConfigError, match="must encode on their own, from pixels"):
        check_config(config, make_mesh(devices=jax.devices()[:1]), Causal(), buckets=[Bucket((3, 16, 16), 8)])
