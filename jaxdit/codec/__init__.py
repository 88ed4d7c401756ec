"""Frozen codecs between videos and the latents the DiT works on (interface: `jaxdit.codec.base`).

A codec directory (`jaxdit.codec.directory`) holds a frozen codec, whatever made it. `save`
writes one (the codec trainer at the end of training, `python -m jaxdit.convert.sd_vae`), `load`
reads one back; a codec-training run's workdir may be given for its `codec/` folder.
A codec is never trained with the DiT: its state is not in the optimizer and it is applied
under `stop_gradient`.
"""

from flax import nnx

from jaxdit import host
from jaxdit.codec.base import to_float, to_uint8
from jaxdit.codec.directory import (
    PARAMS_DIR,
    RUN_CODEC_DIR,
    RUN_RECORD,
    SPEC_FILE,
    check_unchanged,
    codec_directory,
    describe,
    save,
)
from jaxdit.codec.identity import IdentityCodec
from jaxdit.config import CodecConfig


def codec_class(kind: str):
    """The module class of a codec kind (imported only when used)."""
    if kind == "identity":
        return IdentityCodec
    if kind == "autoencoder":
        from jaxdit.codec.autoencoder import VideoAutoencoder

        return VideoAutoencoder
    if kind == "linear":
        from jaxdit.codec.pca import LinearCodec

        return LinearCodec
    if kind == "sd_vae":
        from jaxdit.codec.sd_vae import SDVAE

        return SDVAE
    if kind == "wan_vae":
        from jaxdit.codec.wan_vae import WanVAE

        return WanVAE
    raise ValueError(f"unknown codec kind {kind!r}: one of identity, autoencoder, linear, sd_vae, wan_vae.")


def make_codec(config: CodecConfig):
    """The frozen codec a run's config names."""
    if config.kind == "identity":
        return IdentityCodec()
    return load(config.path)


def load(path):
    """The frozen codec saved at `path` (a codec directory or a codec-training run), parameters on the host."""
    import jax
    import orbax.checkpoint as ocp

    from jaxdit.orbax_reads import first_line, quiet_failed_reads

    directory = codec_directory(path).absolute()
    info = describe(directory)
    cls = codec_class(info["kind"])
    abstract = nnx.eval_shape(lambda: cls(**info["spec"], rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(params):
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
        try:
            with ocp.StandardCheckpointer() as checkpointer, quiet_failed_reads():
                restored = checkpointer.restore(directory / PARAMS_DIR, target)
        except Exception as error:  # one copy, no older one to fall back to: say which file and why
            raise ValueError(
                f"the codec's parameters in {directory / PARAMS_DIR} do not read: {first_line(error)}. Copy the codec "
                "folder again from where it came, or write it again (a codec-training run writes it at its end)."
            ) from error
        nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)


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
    apply = jax.jit(
        lambda state, x: getattr(nnx.merge(graphdef, state), method)(x),
        compiler_options=host.compiler_options(jax.default_backend()),
    )
    return lambda x: apply(state, x)


__all__ = [
    "PARAMS_DIR", "RUN_CODEC_DIR", "RUN_RECORD", "SPEC_FILE", "IdentityCodec", "check_unchanged", "codec_class",
    "codec_directory", "describe", "frozen_codec_state", "jitted", "load", "make_codec", "save", "to_float", "to_uint8",
]
