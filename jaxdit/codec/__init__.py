"""Frozen codecs between videos and the latents the DiT works on (interface: `jaxdit.codec.base`).

A codec directory holds a frozen codec, whatever made it:

    DIR/codec.json     {"kind": ..., "spec": {...}, ...}: what to build (kind, keyword arguments), and notes
                       such as how the latent scale was measured
    DIR/params/        its parameters (orbax), absent for a codec without any

`save` writes one (the codec trainer at the end of training, `python -m jaxdit.convert.sd_vae`),
`load` reads one back; a codec-training run's workdir may be given for its `codec/` folder.
A codec is never trained with the DiT: its state is not in the optimizer and it is applied
under `stop_gradient`.
"""

import json
import pathlib

from flax import nnx

from jaxdit.codec.base import to_float, to_uint8
from jaxdit.codec.identity import IdentityCodec
from jaxdit.config import CodecConfig

SPEC_FILE, PARAMS_DIR = "codec.json", "params"
RUN_CODEC_DIR = "codec"  # a codec-training run writes its frozen codec into workdir/codec/
RUN_RECORD = "frozen_codec.json"  # a DiT run's copy of the codec.json of the saved codec it trains on


def codec_class(kind: str):
    """The module class of a codec kind (imported only when used)."""
    if kind == "identity":
        return IdentityCodec
    if kind == "autoencoder":
        from jaxdit.codec.autoencoder import VideoAutoencoder

        return VideoAutoencoder
    if kind == "linear":
        from jaxdit.codec.linear import LinearCodec

        return LinearCodec
    if kind == "sd_vae":
        from jaxdit.codec.sd_vae import SDVAE

        return SDVAE
    raise ValueError(f"unknown codec kind {kind!r}: one of identity, autoencoder, linear, sd_vae.")


def make_codec(config: CodecConfig):
    """The frozen codec a run's config names."""
    if config.kind == "identity":
        return IdentityCodec()
    return load(config.path)


def save(codec, directory, **notes) -> pathlib.Path:
    """Writes `codec` (structure, parameters, scale) as a codec directory; `notes` go into codec.json."""
    import jax
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.state(codec, nnx.Param)
    if jax.tree.leaves(params):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(params), force=True)
    if jax.process_index() == 0:  # every process saves the parameters with orbax; one writes the JSON
        spec = {"kind": codec.kind, "spec": codec.spec(), **notes}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def codec_directory(path) -> pathlib.Path:
    """The codec directory at `path`, or in `path/codec/` (a codec-training run), or a FileNotFoundError."""
    path = pathlib.Path(path)
    for candidate in (path, path / RUN_CODEC_DIR):
        if (candidate / SPEC_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no codec in {str(path)!r} (no {SPEC_FILE} there or in {RUN_CODEC_DIR}/): give a directory written by "
        "a codec training run (train.py with a codec config) or by `python -m jaxdit.convert.sd_vae`."
    )


def describe(path) -> dict:
    """The codec.json of the codec directory at `path`."""
    return json.loads((codec_directory(path) / SPEC_FILE).read_text())


def load(path):
    """The frozen codec saved at `path` (a codec directory or a codec-training run), parameters on the host."""
    import jax
    import orbax.checkpoint as ocp

    directory = codec_directory(path)
    info = describe(directory)
    cls = codec_class(info["kind"])
    abstract = nnx.eval_shape(lambda: cls(**info["spec"], rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(params):
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS_DIR, target)
        nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


def check_unchanged(path, recorded: dict, user: str) -> None:
    """A ValueError when the codec at `path` is no longer the one `user` recorded (its codec.json)."""
    current = describe(path)
    if current != recorded:
        changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
        details = ", ".join(f"{k}: {recorded.get(k)!r} then, {current.get(k)!r} now" for k in changed)
        raise ValueError(
            f"the codec at {str(path)!r} changed since {user} used it ({details}). Latents of another codec "
            "mean nothing to this model: restore that codec, or train the DiT again on the new one."
        )


def frozen_codec_state(codec, mesh) -> nnx.State:
    """The codec's arrays, replicated on every device of the mesh: the frozen argument of every
    jitted step and sampler."""
    import jax

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(nnx.state(codec), replicated)


def jitted(codec, method: str = "encode"):
    """`codec.encode` (or "decode") as one jitted function of its input; the codec's state is passed
    to the compiled program as an argument, never baked into it as constants."""
    import jax

    graphdef, state = nnx.split(codec)
    apply = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))
    return lambda x: apply(state, x)


__all__ = ["IdentityCodec", "check_unchanged", "codec_class", "codec_directory", "describe", "frozen_codec_state", "jitted", "load", "make_codec", "save", "to_float", "to_uint8"]
