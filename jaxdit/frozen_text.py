"""The frozen pretrained text encoder of a run (`text.encoder = "t5"`), handled like the frozen codec.

- `resolve(config)`: the config with text.path absolute and model.text_dim set to the encoder's width.
- `load(config, mesh)`: the encoder and its arrays placed on the mesh (split over `fsdp` like the DiT's
  parameters, so T5-XXL's 4.7B parameters fit beside the DiT); `(None, empty state)` for the byte encoder,
  which is trained with the DiT and lives in its parameters.
- A run records which encoder it used (`RUN_RECORD`) and refuses a changed one on resume and when sampling.

Its arrays are an argument of the jitted train step and of the sampler, never part of the train
state: not in the optimizer, not differentiated, not checkpointed with the run.
"""

import dataclasses
import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.config import Config, ConfigError, TextConfig

log = logging.getLogger(__name__)

RUN_RECORD = "frozen_text.json"  # a run's record of its frozen text encoder


def dtype(text: TextConfig):
    """The encoder's dtype: text.dtype, with "auto" bfloat16 on accelerators and float32 on CPU."""
    if text.dtype != "auto":
        return jnp.dtype(text.dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def resolve(config: Config) -> Config:
    """A t5 run's config with text.path absolute and model.text_dim the encoder's width; others unchanged."""
    if config.text.encoder != "t5":
        return config
    from jaxdit import t5

    if not config.text.path:
        raise ConfigError(
            "text.encoder='t5' needs text.path: a folder holding a transformers T5EncoderModel / UMT5EncoderModel "
            "checkpoint (config.json, model.safetensors, spiece.model or tokenizer.json), e.g. --text.path DIR."
        )
    path = os.path.abspath(config.text.path)
    try:
        spec = t5.T5Spec.from_folder(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config.model.text_dim not in (0, spec.width):
        log.info("model.text_dim %d -> %d, the width of the T5 encoder in %s", config.model.text_dim, spec.width, path)
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, path=path),
        model=dataclasses.replace(config.model, text_dim=spec.width),
    )


def load(config: Config, mesh: jax.sharding.Mesh | None = None):
    """(encoder graphdef or None, its arrays on the mesh): what the train step and the sampler take."""
    if config.text.encoder != "t5":
        return None, nnx.State({})
    from jaxdit import t5
    from jaxdit.sharding import state_sharding

    sharding = (lambda shapes: state_sharding(shapes, mesh)) if mesh is not None else None
    try:
        encoder, _ = t5.load(config.text.path, max_length=config.text.max_length, dtype=dtype(config.text),
                             sharding=sharding)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    graphdef, state = nnx.split(encoder)
    return graphdef, state


def record(text: TextConfig) -> dict | None:
    """What a run or a latent cache records of its frozen encoder: its config.json and the sha256 of its weight
    and tokenizer files. Not where it lives: a moved or copied folder is the same encoder."""
    if text.encoder != "t5":
        return None
    from jaxdit import t5

    folder = t5.check_folder(text.path)
    return {"encoder": text.encoder, "config": json.loads((folder / t5.CONFIG_FILE).read_text()), **t5.digests(folder)}


def check_unchanged(text: TextConfig, recorded: dict, user: str) -> None:
    """A ConfigError when the encoder at text.path is not the one `user` recorded, or is gone."""
    try:
        current = record(text)
    except FileNotFoundError as error:
        raise ConfigError(
            f"{error} {user} needs the text encoder it was made with: give its folder's new place (train.py "
            "--text.path DIR, sample.py --text-path DIR, Pipeline.load(..., text_path=DIR))."
        ) from None
    changed = [key for key in ("config", "weights", "tokenizer") if current.get(key) != recorded.get(key)]
    if changed:
        raise ConfigError(
            f"the text encoder at {text.path!r} is not the one {user} used (its {' and '.join(changed)} changed). "
            "Features of another encoder mean nothing to this model: restore that encoder's folder, or train "
            "again with the new one."
        )


def record_run(config: Config, workdir: pathlib.Path, *, resuming: bool, primary: bool) -> None:
    """Writes the run's RUN_RECORD; a resumed run checks that the encoder is unchanged."""
    if config.text.encoder != "t5":
        return
    path = workdir / RUN_RECORD
    if resuming and path.is_file():
        check_unchanged(config.text, json.loads(path.read_text()), f"the run in {workdir}")
    elif primary:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record(config.text), indent=2) + "\n")


def check_run(config: Config, workdir: pathlib.Path) -> None:
    """Sampling a t5 run: its encoder must be the one it trained with."""
    path = pathlib.Path(workdir) / RUN_RECORD
    if config.text.encoder == "t5" and path.is_file():
        check_unchanged(config.text, json.loads(path.read_text()), f"the run in {workdir}")
