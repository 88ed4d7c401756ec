"""Frozen codecs between videos and the latents the DiT works on.

A codec has `encode(video) -> latents (B, t, h, w, c)`, `decode(latents) -> video in [-1, 1]`,
`latent_shape(video_shape)`, the compression `factors` (t, h, w), the latent `channels` and
the `scale` that brings latents to about unit variance. A codec is never trained with the DiT:
it has no parameters in the optimizer and training encodes under `stop_gradient`.
"""

from jaxdit.codec.identity import IdentityCodec, to_uint8
from jaxdit.config import CodecConfig


def make_codec(config: CodecConfig):
    """The codec a run's config names."""
    if config.kind == "identity":
        return IdentityCodec()
    raise ValueError(f"codec.kind {config.kind!r} is not known.")


__all__ = ["IdentityCodec", "make_codec", "to_uint8"]
