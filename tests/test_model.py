import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from tests.helpers import inputs, pure_forward, randomized, tiny_config

CONDITIONINGS = {
    "unconditional": {},
    "class": {"num_classes": 10},
    "text": {"text_dim": 16},
    "text_pooled_only": {"text_dim": 16, "cross_attention": False},
    "text_and_class_sigma": {"text_dim": 16, "num_classes": 10, "learn_sigma": True},
}

# facebookresearch/DiT's reported parameter counts (trainable + the fixed 256-token position table)
# for the class-conditional ImageNet-256 models.
DIT_PARAMETERS = {"S/2": 32_963_360, "B/2": 130_512_416, "L/2": 458_102_816, "XL/2": 675_129_632}


def abstract_model(config):
    return nnx.eval_shape(lambda: jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", list(DIT_PARAMETERS))
def test_image_variants_have_dits_parameter_counts(variant):
    config = jaxdit.ModelConfig.from_variant(variant, in_channels=4, num_classes=1000, learn_sigma=True)
    params = nnx.state(abstract_model(config), nnx.Param)
    fixed_positions = 16 * 16 * config.width  # 32x32 latents in 2x2 patches, not trained
    assert count(params) + fixed_positions == DIT_PARAMETERS[variant]


@pytest.mark.parametrize(
    "variant, video, conditioning",
    [
        ("S/1x2x2", (2, 4, 8, 8, 4), "text"),
        ("B/2x2x2", (1, 8, 16, 8, 4), "class"),
        ("L/1x4x4", (1, 1, 32, 32, 4), "unconditional"),
        ("XL/2x2x2", (2, 4, 8, 12, 4), "text_and_class_sigma"),
        ("XL/1x2x2", (1, 16, 32, 32, 4), "text"),
    ],
)
def test_output_shapes_over_variants_without_allocating(variant, video, conditioning):
    config = jaxdit.ModelConfig.from_variant(variant, **CONDITIONINGS[conditioning])
    graphdef, state = nnx.split(abstract_model(config))
    batch, length = video[0], 7
    spec = {
        "text": jax.ShapeDtypeStruct((batch, length, config.text_dim), jnp.float32) if config.has_text else None,
        "text_mask": jax.ShapeDtypeStruct((batch, length), jnp.bool_) if config.has_text else None,
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32) if config.num_classes else None,
    }
    out = jax.eval_shape(
        lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, **c),
        state, jax.ShapeDtypeStruct(video, jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32), spec,
    )
    chex.assert_shape(out, (*video[:4], config.out_channels))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("conditioning", list(CONDITIONINGS))
def test_output_is_exactly_zero_at_init(conditioning):
    config = tiny_config(**CONDITIONINGS[conditioning])
    model = jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))
    x, t, conditions = inputs(config)
    out = pure_forward(model)(x, t, **conditions)
    chex.assert_shape(out, (*x.shape[:4], config.out_channels))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_every_block_is_the_identity_at_init(conditioning):
    config = tiny_config(**CONDITIONINGS[conditioning])
    model = jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))
    kx, kc, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 12, config.width))
    c = jax.random.normal(kc, (2, config.width))
    text = jax.random.normal(kt, (2, 3, config.text_dim)) if config.has_text else None
    mask = jnp.ones((2, 3), bool) if config.has_text else None
    for block in model.blocks:
        np.testing.assert_array_equal(block(x, c, text, mask), x)


def test_padded_text_tokens_do_not_change_the_output():
    config = tiny_config(text_dim=16)
    forward = pure_forward(randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))))
    x, t, cond = inputs(config, text_len=5)
    reference = forward(x, t, **cond)
    # Garbage tokens behind the mask, appended and interleaved, change nothing.
    garbage = 100.0 * jax.random.normal(jax.random.key(7), (2, 3, config.text_dim))
    text = jnp.concatenate([garbage[:, :1], cond["text"], garbage[:, 1:]], axis=1)  # (B, 8, E)
    mask = jnp.concatenate([jnp.zeros((2, 1), bool), cond["text_mask"], jnp.zeros((2, 2), bool)], axis=1)
    chex.assert_trees_all_close(forward(x, t, text=text, text_mask=mask), reference, atol=1e-5, rtol=1e-5)
    # ... while a real token does, so the check above can fail.
    assert not np.allclose(forward(x, t, text=text, text_mask=mask.at[:, 0].set(True)), reference, atol=1e-3)


def test_a_caption_with_no_valid_token_conditions_on_nothing():
    config = tiny_config(text_dim=16)
    forward = pure_forward(randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))))
    x, t, cond = inputs(config)
    empty = jnp.zeros_like(cond["text_mask"])
    out_a = forward(x, t, text=cond["text"], text_mask=empty)
    out_b = forward(x, t, text=-cond["text"], text_mask=empty)
    assert np.isfinite(out_a).all()
    np.testing.assert_array_equal(out_a, out_b)


def test_patch_embedding_is_a_strided_conv3d():
    config = tiny_config(variant="tiny/2x2x4")
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, config.in_channels))
    tokens = model.patch_embed(jaxdit.patch.patchify(x, config.patch))  # (B, N, D)
    kernel = model.patch_embed.kernel[...].reshape(*config.patch, config.in_channels, config.width)
    conv = jax.lax.conv_general_dilated(
        x, kernel, window_strides=config.patch, padding="VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    ) + model.patch_embed.bias[...]  # (B, T', H', W', D)
    chex.assert_trees_all_close(tokens, conv.reshape(tokens.shape), atol=1e-5)


def test_token_linear_is_nnx_linear_with_the_same_parameters_and_gradients():
    """blocks.Linear folds the token axes into one 2-D product (fast on XLA:CPU); nothing else changes."""
    ours = jaxdit.blocks.Linear(5, 7, rngs=nnx.Rngs(0))
    theirs = nnx.Linear(5, 7, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))  # (B, T, N, D_in): any leading axes

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    chex.assert_trees_all_close(ours(x), theirs(x), atol=1e-6)
    chex.assert_trees_all_close(
        nnx.grad(loss, argnums=(0, 1))(ours, x), nnx.grad(loss, argnums=(0, 1))(theirs, x), atol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norm_modulate_and_gelu_match_flax_and_keep_only_their_inputs(dtype):
    """adaLN's norm is flax's LayerNorm (no scale or bias), the GELU DiT's tanh GELU, values and
    gradients; for the backward pass both keep only their inputs, not float32 copies or GELU's parts."""
    from jaxdit.blocks import gelu, modulate, norm_modulate

    kx, ks, kc, kw = jax.random.split(jax.random.key(0), 4)
    x = (3 * jax.random.normal(kx, (2, 5, 16)) + 1).astype(dtype)  # (B, N, D)
    weights = jax.random.normal(kw, (2, 5, 16))  # a loss linear in the output, so the output need not be kept
    shift, scale = (jax.random.normal(k, (2, 16), dtype) for k in (ks, kc))  # (B, D)
    flax_norm = nnx.LayerNorm(16, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, rngs=nnx.Rngs(0))

    def theirs(x, shift, scale):
        return jnp.sum(jax.nn.gelu(modulate(flax_norm(x), shift, scale), approximate=True).astype(jnp.float32) * weights)

    def ours(x, shift, scale):
        return jnp.sum(gelu(norm_modulate(x, shift, scale)).astype(jnp.float32) * weights)

    f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, shift, scale) for f in (ours, theirs))
    chex.assert_trees_all_close(f32(got), f32(want), rtol=tolerance, atol=tolerance)
    token_sized = {"float32": "f32[2,5,16]", "bfloat16": "bf16[2,5,16]"}
    kept = [line.split()[0] for line in saved_residuals(ours, x, shift, scale) if "[2,5,16]" in line]
    assert kept == [token_sized[jnp.dtype(dtype).name]] * 2  # x, and the GELU's input
    assert len([line for line in saved_residuals(theirs, x, shift, scale) if "[2,5,16]" in line]) > 4


def saved_residuals(f, *args) -> list[str]:
    """The arrays autodiff of f keeps for the backward pass, one line each ("bf16[2,5,16] output of ..."),
    closed-over constants left out."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        print_saved_residuals(f, *args)
    return [line for line in printed.getvalue().splitlines() if "from a constant" not in line]


def test_jitted_forward_matches_eager_and_changes_with_inputs():
    config = tiny_config(**CONDITIONINGS["text_and_class_sigma"])
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
    x, t, cond = inputs(config)
    jitted = pure_forward(model)(x, t, **cond)
    chex.assert_trees_all_close(jitted, model(x, t, **cond), rtol=1e-4, atol=1e-4)
    assert not np.allclose(pure_forward(model)(x, t + 1, **cond), jitted, atol=1e-4)
    other_label = (cond["label"] + 1) % config.num_classes
    assert not np.allclose(pure_forward(model)(x, t, **{**cond, "label": other_label}), jitted, atol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters():
    config = tiny_config(**CONDITIONINGS["text"])
    model32 = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)), scale=0.05)
    model16 = jaxdit.VideoDiT(tiny_config(**CONDITIONINGS["text"], dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(model16, nnx.state(model32, nnx.Param))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x, t, cond = inputs(config)
    out16, out32 = pure_forward(model16)(x, t, **cond), pure_forward(model32)(x, t, **cond)
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out16, out32)  # it really ran in bfloat16 ...
    np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()))  # ... to bf16 accuracy


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(policy):
    config = tiny_config(**CONDITIONINGS["text"])
    x, t, cond = inputs(config)

    def loss_and_grads(config):
        model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params, rest)(x, t, **cond) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    reference = loss_and_grads(config)
    chex.assert_trees_all_close(loss_and_grads(tiny_config(**CONDITIONINGS["text"], remat=policy)), reference, atol=1e-6)


def test_label_dropout_in_training_uses_the_null_label_and_is_reseedable():
    config = tiny_config(num_classes=10, class_dropout_prob=0.5)
    model = jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))
    labels = jnp.zeros((256,), jnp.int32)
    embedder = model.label_embed
    null, real = embedder.table(jnp.array(10)), embedder.table(jnp.array(0))

    nnx.reseed(model, dropout=jax.random.key(1))
    dropped = embedder(labels, train=True)
    is_null = np.all(np.asarray(dropped) == np.asarray(null), axis=1)
    assert np.all(is_null | np.all(np.asarray(dropped) == np.asarray(real), axis=1))
    assert 0.35 < is_null.mean() < 0.65
    nnx.reseed(model, dropout=jax.random.key(1))
    np.testing.assert_array_equal(embedder(labels, train=True), dropped)  # same key, same drops
    np.testing.assert_array_equal(embedder(labels, train=False), jnp.broadcast_to(real, dropped.shape))


@pytest.mark.parametrize(
    "conditioning, call, message",
    [
        ("unconditional", lambda x, t, c: dict(x=x[..., :3], t=t), r"in_channels=4"),
        ("unconditional", lambda x, t, c: dict(x=x[:, :3], t=t), "frames 3 by 2"),
        ("unconditional", lambda x, t, c: dict(x=x, t=t[:1]), "one diffusion step per sample"),
        ("class", lambda x, t, c: dict(x=x, t=t), "class-conditional"),
        ("unconditional", lambda x, t, c: dict(x=x, t=t, label=t), "num_classes=0"),
        ("text", lambda x, t, c: dict(x=x, t=t), "text-conditioned"),
        ("text", lambda x, t, c: dict(x=x, t=t, text=c["text"][..., :3]), "text_dim=16"),
        ("text", lambda x, t, c: dict(x=x, t=t, text=c["text"], text_mask=c["text_mask"][:, :2]), "text_mask"),
        ("unconditional", lambda x, t, c: dict(x=x, t=t, text=jnp.zeros((2, 3, 16))), "text_dim=0"),
    ],
)
def test_bad_inputs_give_clear_errors(conditioning, call, message):
    config = tiny_config(**CONDITIONINGS[conditioning])
    model = jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))
    x, t, cond = inputs(config)
    kwargs = call(x, t, {**cond, **inputs(tiny_config(text_dim=16))[2]})
    with pytest.raises(ValueError, match=message):
        model(kwargs.pop("x"), kwargs.pop("t"), **kwargs)


def test_data_parallel_forward_over_eight_devices():
    config = tiny_config(**CONDITIONINGS["text"])
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
    x, t, cond = inputs(config, batch=8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = jax.NamedSharding(mesh, jax.P("data"))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))
    sharded = jax.device_put((x, t, cond), batch_sharding)

    @jax.jit
    def forward(state, x, t, cond):
        return nnx.merge(graphdef, state)(x, t, **cond)

    out = forward(state, *sharded)
    assert out.sharding.spec[0] == "data"
    chex.assert_trees_all_close(out, pure_forward(model)(x, t, **cond), rtol=1e-4, atol=3e-4)


def test_one_model_runs_at_other_resolutions_and_durations():
    config = tiny_config(**CONDITIONINGS["text"])
    forward = pure_forward(randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))))
    _, t, cond = inputs(config)
    for frames, height, width in [(2, 8, 8), (4, 8, 12), (8, 16, 4)]:
        x = jax.random.normal(jax.random.key(frames), (2, frames, height, width, config.in_channels))
        out = forward(x, t, **cond)
        chex.assert_shape(out, x.shape)
        chex.assert_tree_all_finite(out)
