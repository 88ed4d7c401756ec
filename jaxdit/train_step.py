"""The train state and the pure train step `(state, batch, rng, codec_state, text_state, base_state) ->
(state, metrics)`.

One step for both tasks: the Denoiser learns the diffusion objective on latents of the frozen
codec (`task="dit"`), or a VideoAutoencoder learns to be a codec (`task="codec"`); only the
model and its loss differ. The frozen codec's state, a frozen text encoder's (T5, empty for the
byte encoder) and a LoRA run's base weights (empty for any other run: `jaxdit.lora`) are arguments
of the compiled step, not part of the train state: they are never differentiated, updated or
checkpointed with the run.

Shapes before memory: `abstract_train_state` traces the initialisation with `jax.eval_shape`
and gives every array its sharding from the rules in `jaxdit.sharding`; `create_train_state`
runs the initialisation once under `jit` with those output shardings, so nothing is ever built
on one device and moved, and a checkpoint restores into the same abstract state. `make_train_step` jits the step once with the same shardings and donates
the state.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxdit import context_parallel, diffusion, flow, frames, host, lora
from jaxdit.codec import frozen_codec_state  # noqa: F401 (what the step takes as codec_state; callers find it here too)
from jaxdit.codec.autoencoder import VideoAutoencoder, codec_loss
from jaxdit.config import Config, TrainConfig, parse_condition
from jaxdit.denoiser import Denoiser
from jaxdit.sharding import batch_sharding, is_stacked, state_sharding

# optax.apply_if_finite gives up and applies a non-finite update after this many in a row; the
# training loop stops long before (train.max_bad_steps), so a bad update is never applied.
_NEVER_GIVE_UP = 2**30
_CONDITION_STREAM = 4  # folded into a step's key for its frame conditioning (the other draws keep theirs)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 (): steps taken so far, skipped ones included
    params: nnx.State  # the trained model's: the Denoiser (VideoDiT and text encoder), or a LoRA run's adapters
    ema: nnx.State  # exponential moving average of `params`, used for sampling
    opt_state: optax.OptState
    model_rngs: nnx.State  # the model's RNG streams (class-label dropout), reseeded every step
    rng: jax.Array  # the run's root key; step s draws its noise from fold_in(rng, s)


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 0 at `train.steps`."""
    if train.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps, train.steps)
    if train.warmup_steps == 0:
        return optax.constant_schedule(train.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps), optax.constant_schedule(train.learning_rate)],
        [train.warmup_steps],
    )


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW with clipping, wrapped so that a step with non-finite gradients changes nothing."""
    def decay_mask(params):  # weight matrices only; stacked blocks (scan_layers) have a leading layer axis
        def is_matrix(path, p):
            return p.ndim >= 2 + is_stacked(path)

        return jax.tree_util.tree_map_with_path(is_matrix, params)

    adamw = optax.adamw(
        learning_rate_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
        weight_decay=train.weight_decay, mask=decay_mask,
    )
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    return optax.apply_if_finite(optax.chain(clip, adamw), max_consecutive_errors=_NEVER_GIVE_UP)


def make_model(config: Config, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model the config's task trains: the Denoiser (with LoRA adapters: train.lora_rank), or the video
    autoencoder."""
    if config.task == "codec":
        return VideoAutoencoder.from_config(config.autoencoder, rngs=rngs)
    model = Denoiser(config, rngs=rngs)
    if config.train.lora_rank:
        lora.add_adapters(model.dit, config.train, rngs=rngs)
    return model


def split_model(model: nnx.Module, config: Config) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """The model -> (graphdef, trained parameters, frozen base parameters, the rest: RNG streams). A LoRA run
    trains its adapters and keeps every other parameter frozen; any other run trains them all (no base)."""
    if config.train.lora_rank:
        return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, nnx.State({}), rest


def model_graphdef(config: Config) -> nnx.GraphDef:
    """The trained model's structure, which merges with a state's arrays; no memory is used."""
    return nnx.split(nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]


def _init_state(config: Config, tx: optax.GradientTransformation, rng: jax.Array, params=None) -> TrainState:
    model = make_model(config, rngs=nnx.Rngs(jax.random.fold_in(rng, 0)))
    _, initialised, _, model_rngs = split_model(model, config)  # a LoRA run's base weights come from train.init_from
    params = initialised if params is None else params  # given ones: jit drops the initialisation
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        model_rngs=model_rngs,
        rng=rng,
    )


def abstract_train_state(config: Config, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the train state: the target for a checkpoint restore."""
    init = functools.partial(_init_state, config, make_optimizer(config.train))
    shapes = jax.eval_shape(init, jax.random.key(config.train.seed))
    return _with_shardings(shapes, mesh)


def abstract_base(config: Config, mesh: jax.sharding.Mesh) -> nnx.State:
    """Shapes, dtypes and shardings of a LoRA run's frozen base parameters (empty for any other run): the
    parameters of its model without adapters, floating point in train.lora_base_dtype, as
    `jaxdit.init_from.base_params` reads them."""
    if not config.train.lora_rank:
        return nnx.State({})
    return stored_in(abstract_train_state(lora.base_config(config), mesh).params, config.train.lora_base_dtype)


def stored_in(abstract, dtype: str):
    """Abstract arrays (ShapeDtypeStructs with shardings) with the floating-point ones in `dtype`; the rest (RNG
    keys, counts) and every shape and sharding as they are."""
    def stored(x):
        kept = x.dtype if not jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(x.shape, kept, sharding=x.sharding)

    return jax.tree.map(stored, abstract)


def _with_shardings(shapes, mesh: jax.sharding.Mesh):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding(shapes, mesh)
    )


def create_train_state(config: Config, abstract_state: TrainState, params: nnx.State | None = None) -> TrainState:
    """A fresh train state, each array created directly with the sharding `abstract_state` gives it.

    params: the starting parameters (and EMA), laid out as `abstract_state.params` (another run's weights:
    `jaxdit.init_from`), donated; None initialises them from the config's seed.
    """
    init = functools.partial(_init_state, config, make_optimizer(config.train))
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    if params is None:
        return jax.jit(init, out_shardings=shardings)(jax.random.key(config.train.seed))
    return jax.jit(init, out_shardings=shardings, donate_argnums=1)(jax.random.key(config.train.seed), params)


def flow_shift(config: Config, latent_shape: tuple[int, ...]) -> float:
    """The flow time shift for latents (..., T, H, W, C): diffusion.shift, scaled by their token count if asked."""
    grid = [size // p for size, p in zip(latent_shape[-4:-1], config.model.patch, strict=True)]
    d = config.diffusion
    return flow.resolve_shift(d.shift, d.shift_reference_tokens, math.prod(grid))


def diffusion_loss(
    model, batch: dict, rng: jax.Array, *, config: Config, codec, text_encoder=None
) -> tuple[jax.Array, dict]:
    """The DiT objective on one batch: noise the codec's latents at random times, predict, MSE (+ vb).

    text_encoder: a frozen one (T5) whose features condition the model; a latent cache's stored
    features ("text_features") stand in for it.

    DDPM (DiT): steps t ~ U{0..num_steps-1}, the loss on the configured target (+ vb with learn_sigma).
    Flow matching: times t in (0, 1) as configured, the network sees t * 1000, the loss on the velocity.
    """
    d = config.diffusion
    noise_rng, t_rng, dropout_rng = jax.random.split(rng, 3)
    if "latents" in batch:  # a latent cache: encoded once, ahead of training
        x0 = batch["latents"]  # (B, T, H, W, C)
    else:
        x0 = jax.lax.stop_gradient(codec.encode(batch["video"]))  # (B, T, H, W, C), the frozen codec
    latent_frames = x0.shape[1]
    x0 = frames.pad_frames(x0, config.model.patch[0])  # an image fills a temporal patch as a still clip
    given = mask = keep = None
    if config.model.frame_condition:  # each clip's given frames: clean in x_t, out of the loss
        given, mask = _given_frames(batch, x0, latent_frames, jax.random.fold_in(rng, _CONDITION_STREAM), config, codec)
        keep = ~mask  # (B, T)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)  # (B, T, H, W, C)
    if d.process == "flow":
        t = flow.sample_time(
            t_rng, x0.shape[0], sampling=d.time_sampling, mean=d.time_mean, std=d.time_std,
            shift=flow_shift(config, x0.shape),
        )  # (B,) in (0, 1)
        x_t, model_t = flow.interpolate(x0, noise, t), t * flow.TIME_SCALE  # (B, T, H, W, C), (B,)
    else:
        schedule = diffusion.make_schedule(d.schedule, d.num_steps)
        t = model_t = diffusion.sample_timesteps(t_rng, x0.shape[0], schedule.num_steps)  # (B,)
        x_t = diffusion.q_sample(schedule, x0, t, noise)  # (B, T, H, W, C)
    if mask is not None:
        x_t = frames.keep_given(x_t, given, mask)  # (B, T, H, W, C)
    text = batch.get("text_features")  # (B, L, E) from a cache, or None
    if text is None and text_encoder is not None:
        text = jax.lax.stop_gradient(text_encoder(batch["text_tokens"], batch["text_mask"]))  # (B, L, E)
    nnx.reseed(model, dropout=dropout_rng)
    prediction = model(
        x_t, model_t, text_tokens=batch.get("text_tokens"), text_mask=batch.get("text_mask"), text=text,
        label=batch.get("label"), given=given, given_mask=mask, train=True,
    )  # (B, T, H, W, C or 2C)
    if d.process == "flow":
        per_example, terms = flow.loss(prediction, x0, x_t, noise, t, prediction=d.prediction, keep=keep)  # (B,)
    else:
        per_example, terms = diffusion.loss(
            schedule, prediction, x0, x_t, noise, t, prediction=d.prediction, learn_sigma=config.model.learn_sigma,
            keep=keep,
        )  # (B,)
    return per_example.mean(), {name: term.mean() for name, term in terms.items()}


def _given_frames(
    batch: dict, x0: jax.Array, latent_frames: int, rng: jax.Array, config: Config, codec
) -> tuple[jax.Array, jax.Array]:
    """Each clip's kind of frame conditioning, drawn from train.condition: (given latents (B, T, H, W, C),
    mask (B, T) bool of the given frames). An image (one latent frame, maybe padded) has none given."""
    batch_size, length = x0.shape[:2]
    if latent_frames == 1:
        return x0, jnp.zeros((batch_size, length), bool)
    probabilities = parse_condition(config.train.condition)
    kinds, mask = frames.draw_masks(rng, batch_size, length, probabilities, config.train.condition_frames)
    if "latents" in batch:  # a latent cache (check_config refuses trailing references of a causal codec)
        return x0, mask
    return frames.reference_latents(codec, batch["video"], x0, kinds, config.train.condition_frames), mask


def train_step(
    state: TrainState, batch: dict, rng: jax.Array, codec_state: nnx.State, text_state: nnx.State,
    base_state: nnx.State, *, graphdef: nnx.GraphDef, codec_graphdef: nnx.GraphDef,
    text_graphdef: nnx.GraphDef | None, config: Config, tx,
) -> tuple[TrainState, dict]:
    """One update of the trained model on one global batch.

    batch: {"video": uint8 (B, T, H, W, 3) or "latents" (B, t, h, w, c), "text_tokens", "text_mask": (B, L)
    [, "text_features": (B, L, E) from a cache] [, "label": (B,)]}. codec_state: the frozen codec's
    arrays (empty for the identity codec); text_state: the frozen text encoder's (empty for none);
    base_state: a LoRA run's frozen base parameters (empty for any other run), which its adapters
    (`state.params`) adapt.
    """
    codec = nnx.merge(codec_graphdef, codec_state)
    text_encoder = nnx.merge(text_graphdef, text_state) if text_graphdef is not None else None

    def loss_fn(params):
        # Fresh copies of the RNG streams (the loss reseeds them inside this trace: class-label dropout) and of a
        # LoRA run's base weights (nnx's transforms, the scan over stacked blocks, take only this trace's variables).
        fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # noqa: E731
        model = nnx.merge(graphdef, fresh(base_state), params, fresh(state.model_rngs))
        if config.task == "codec":
            return codec_loss(model, batch, rng, config=config.autoencoder)
        return diffusion_loss(model, batch, rng, config=config, codec=codec, text_encoder=text_encoder)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = opt_state.last_finite  # False: the update was skipped, params and moments kept
    decay = config.train.ema_decay
    ema = jax.tree.map(lambda e, p: jnp.where(finite, decay * e + (1 - decay) * p, e), state.ema, params)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": learning_rate_schedule(config.train)(state.step),
        "skipped": ~finite,
        "bad_steps": opt_state.notfinite_count,  # consecutive skipped steps
        "skipped_total": opt_state.total_notfinite,
    }
    state = dataclasses.replace(state, step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
    return state, metrics


def make_train_step(
    config: Config, graphdef: nnx.GraphDef, codec, mesh: jax.sharding.Mesh, abstract_state: TrainState,
    text_encoder: tuple[nnx.GraphDef | None, nnx.State] | None = None, base_state: nnx.State | None = None,
):
    """`train_step` jitted once over the mesh, with the state donated: `step(state, batch, rng, codec_state,
    text_state, base_state)`.

    codec_state is `frozen_codec_state(codec, mesh)`, the codec's arrays replicated over the mesh.
    text_encoder: `jaxdit.frozen_text.load(config, mesh)`, the frozen encoder's graphdef and the arrays the
    step takes as text_state (keeping their shardings); the default is none (an empty text_state).
    base_state: a LoRA run's base parameters, or their `abstract_base` (the shardings are what counts); the
    default is `abstract_base(config, mesh)`, which is empty for any other run.
    The step is traced on the mesh, so a `context` axis over several devices splits the video tokens
    (`jaxdit.context_parallel`).
    """
    text_graphdef, text_state = text_encoder or (None, nnx.State({}))
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = functools.partial(
        train_step, graphdef=graphdef, codec_graphdef=nnx.graphdef(codec), text_graphdef=text_graphdef,
        config=config, tx=make_optimizer(config.train),
    )
    text_shardings = jax.tree.map(lambda x: x.sharding, text_state)
    base_shardings = jax.tree.map(lambda x: x.sharding, abstract_base(config, mesh) if base_state is None else base_state)
    return jax.jit(
        context_parallel.traced_on(mesh, step),
        in_shardings=(state_shardings, batch_sharding(mesh), replicated, replicated, text_shardings, base_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
        compiler_options=host.compiler_options(mesh.devices.flat[0].platform),
    )

