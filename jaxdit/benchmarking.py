"""What the speed benchmarks (benchmarks/train.py, benchmarks/sample.py, benchmarks/compare_torch.py)
share: the config from a file, named flags and overrides; the compiled train step on a synthetic
batch; what a measured rate means on the devices (TFLOP/s, MFU, peak memory); a record printed as
a table and appended as one JSON line. Figures are printed, never asserted.
"""

import datetime
import json
import pathlib


def build_config(config_file: str, overrides: list[str], named: dict):
    """The config of `config_file` with `--section.field VALUE` overrides, then the benchmark's named
    flags (`{"train.batch_size": 64, ...}`, None where not given); returns (config, the flags applied)."""
    from jaxdit.config import apply_overrides, load_config

    flags = list(overrides) + [part for key, value in named.items() if value is not None for part in (f"--{key}", str(value))]
    return apply_overrides(load_config(config_file), flags), flags


def peak_memory_bytes(devices) -> int | None:
    """The most memory any device has held, from its allocator; None where it does not say (CPU)."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory(compiled) -> dict:
    """What XLA's compiled program holds on one device (an SPMD program is one device's): its
    arguments, outputs and temporaries (activations, gradients, workspace), and their sum less the
    outputs that reuse a donated argument's buffer; XLA's own account, so also on CPU, where the
    allocator keeps no peak (and nothing is donated)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"memory_per_device_bytes": None}
    sizes = {
        "argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes), "temp_bytes": int(stats.temp_size_in_bytes),
    }
    total = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
    return sizes | {"memory_per_device_bytes": total}


def describe(benchmark: str, config, devices: int, tokens: int, mesh=None) -> dict:
    """The head of a record: which benchmark, config and model ran, on what, and the self-attention
    implementation that ran over its `tokens` space-time tokens (the model's own choice under "auto", made
    on `mesh`, the one the benchmark's program is traced on: a TPU runs splash per device there)."""
    import contextlib

    import jax

    from jaxdit.attention import resolve_implementation

    model = config.model
    on_mesh = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()
    with on_mesh:
        attention = resolve_implementation(model.attention, model.dtype, model.width // model.heads, (tokens, tokens))
    return {
        "benchmark": benchmark, "config": config.name, "variant": model.variant,
        "device": jax.devices()[0].device_kind, "devices": devices, "attention": attention,
    }


def rate_figures(flops_per_item: float, items_per_s: float, devices: int) -> dict:
    """What a measured rate means on these devices: TFLOP/s, the peak, MFU (None off a known peak),
    peak memory, and the jax and backend that ran it; the tail of both benchmarks' records."""
    import jax

    from jaxdit import flops

    kind = jax.devices()[0].device_kind
    return {
        "tflops_per_s": flops_per_item * items_per_s / 1e12,
        "peak_tflops_per_device": flops.peak_tflops(kind),
        "mfu": flops.model_flops_utilization(flops_per_item, items_per_s, devices, kind),
        "peak_memory_bytes": peak_memory_bytes(jax.local_devices()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def report(record: dict, *, config_file: str, flags: list[str], out: str | None) -> dict:
    """Adds where the figures came from, prints them as a table, appends them to `out` as a JSON line."""
    record = record | {"config_file": config_file, "overrides": flags, "time": datetime.datetime.now().isoformat(timespec="seconds")}
    width = max(map(len, record))
    for name, value in record.items():
        shown = f"{value:.4g}" if isinstance(value, float) else "n/a" if value is None else str(value)
        print(f"{name:<{width}}  {shown}")
    if out:
        with pathlib.Path(out).open("a") as file:
            file.write(json.dumps(record) + "\n")
    return record


def synthetic_batch(config, latent_shape, *, latents: bool, mesh, abstract: bool = False):
    """A random global batch made on the devices, split over the mesh as train.py's batches are
    (`abstract`: only its shapes, dtypes and shardings)."""
    import jax
    import jax.numpy as jnp

    from jaxdit.sharding import batch_sharding
    from jaxdit.text import VOCAB_SIZE

    b, data, model = config.train.batch_size, config.data, config.model
    vocab = VOCAB_SIZE
    if config.text.encoder == "t5":  # token ids the frozen T5 embeds
        from jaxdit.t5 import T5Spec

        vocab = T5Spec.from_folder(config.text.path).vocab_size

    def make(key):
        pixels_key, text_key, label_key = jax.random.split(key, 3)
        if latents:
            batch = {"latents": jax.random.normal(pixels_key, (b, *latent_shape), jnp.float32)}  # (B, T, H, W, C)
        else:
            shape = (b, data.num_frames, data.size, data.size, 3)
            batch = {"video": jax.random.bits(pixels_key, shape, jnp.uint8)}  # (B, T, H, W, 3)
        if model.has_text:
            length = config.text.max_length
            batch["text_tokens"] = jax.random.randint(text_key, (b, length), 0, vocab, jnp.int32)  # (B, L)
            batch["text_mask"] = jnp.ones((b, length), bool)  # (B, L): attention costs the same masked or not
        if model.num_classes:
            batch["label"] = jax.random.randint(label_key, (b,), 0, model.num_classes, jnp.int32)  # (B,)
        return batch

    make = jax.jit(make, out_shardings=batch_sharding(mesh))
    return (jax.eval_shape if abstract else lambda f, key: f(key))(make, jax.random.key(config.train.seed))


def random_base(config, mesh):
    """A LoRA config's frozen base weights, randomly initialised, in train.lora_base_dtype and with the shardings the
    step takes them in (`jaxdit.train_step.abstract_base`; empty for any other config)."""
    import jax

    from jaxdit.lora import base_config
    from jaxdit.train_step import abstract_base, abstract_train_state, create_train_state

    target = abstract_base(config, mesh)
    if not config.train.lora_rank:
        return target
    base = create_train_state(base_config(config), abstract_train_state(base_config(config), mesh)).params
    return jax.tree.map(lambda x, stored: x.astype(stored.dtype), base, target)


def compiled_train_step(config, *, latents: bool, abstract: bool = False) -> dict:
    """train.py's jitted train step for `config`, compiled ahead of time, with a fresh state, a
    synthetic batch (`synthetic_batch`) and the frozen codec's and text encoder's states. With `latents`
    the batch holds (num_frames, size, size, in_channels) latents and the step never calls a codec. With
    `abstract` the state and batch are only shapes (nothing is allocated: for memory figures of models too
    big for this machine) and the step cannot be run.

    A LoRA config (train.lora_rank) trains adapters on base weights of its own random initialisation.

    Returns {"step": compiled(state, batch, rng, *frozen) -> (state, metrics), "state", "batch",
    "frozen": (codec_state, text_state, base_state), "latent_shape", "mesh", "compile_s"}.
    """
    import time

    import jax

    from jaxdit import frozen_text
    from jaxdit.codec import IdentityCodec, frozen_codec_state, make_codec
    from jaxdit.sharding import data_parallel_size, make_mesh
    from jaxdit.train_loop import check_config
    from jaxdit.train_step import (
        abstract_base,
        abstract_train_state,
        create_train_state,
        make_train_step,
        model_graphdef,
    )

    if config.task != "dit":
        raise ValueError("the train-step benchmarks time the DiT train step: use a DiT config (task='dit').")
    config = frozen_text.resolve(config)
    model, data = config.model, config.data
    mesh = make_mesh(config.train.fsdp, context=config.train.context)
    if latents:  # the step reads latents from the batch and never calls the codec
        codec = IdentityCodec()
        latent_shape = (data.num_frames, data.size, data.size, model.in_channels)
        devices = data_parallel_size(mesh)
        if config.train.batch_size % devices:
            raise ValueError(
                f"--batch-size {config.train.batch_size} must be divisible by the {devices} data-parallel devices "
                f"(devices / context)."
            )
    else:
        codec = make_codec(config.codec)
        check_config(config, mesh, codec)
        latent_shape = tuple(codec.latent_shape((data.num_frames, data.size, data.size, 3)))
    abstract_state = abstract_train_state(config, mesh)
    state = abstract_state if abstract else create_train_state(config, abstract_state)
    text_encoder = frozen_text.load(config, mesh)
    step = make_train_step(config, model_graphdef(config), codec, mesh, abstract_state, text_encoder)
    base_state = abstract_base(config, mesh) if abstract else random_base(config, mesh)
    frozen = (frozen_codec_state(codec, mesh), text_encoder[1], base_state)
    batch = synthetic_batch(config, latent_shape, latents=latents, mesh=mesh, abstract=abstract)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0), *frozen).compile()
    return {
        "step": compiled, "state": state, "batch": batch, "frozen": frozen,
        "latent_shape": latent_shape, "mesh": mesh, "compile_s": time.perf_counter() - start,
    }
