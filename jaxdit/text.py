"""The text side: a byte-level tokenizer that needs no downloaded files, and a small trainable
transformer text encoder.

Axes: B batch, L text tokens, E text width, K heads.

`make_tokenizer` picks the config's tokenizer (a frozen T5's lives in jaxdit.t5). The encoder is an
interface: anything that maps `(tokens (B, L) int32, mask (B, L) bool)` to
token features `(B, L, E)` can stand in for it (a frozen pretrained encoder, or precomputed
embeddings). The model pools the valid token features itself (masked mean) for adaLN and
attends to them with cross-attention.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdit.blocks import Mlp, SelfAttention
from jaxdit.embed import EMBED_STD

log = logging.getLogger(__name__)

PAD, BOS, EOS = 0, 1, 2  # special tokens; byte b is token b + _BYTE_OFFSET
_BYTE_OFFSET = 3
VOCAB_SIZE = 256 + _BYTE_OFFSET


class ByteTokenizer:
    """UTF-8 bytes as tokens, framed by BOS and EOS and right-padded with PAD to `max_length`.

    A caption longer than `max_length - 2` bytes is truncated; each truncation is counted in
    `truncated` and the first one is logged. The empty caption (caption dropout's null
    caption) is just BOS EOS.
    """

    def __init__(self, max_length: int):
        if max_length < 3:
            raise ValueError(f"text.max_length must be at least 3 (BOS, one byte, EOS), got {max_length}.")
        self.max_length = max_length
        self.truncated = 0

    def encode(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """caption -> tokens int32 (L,), mask bool (L,) with L = max_length."""
        body = np.frombuffer(caption.encode("utf-8"), np.uint8).astype(np.int32) + _BYTE_OFFSET
        if body.size > self.max_length - 2:
            if not self.truncated:
                log.warning(
                    "caption of %d bytes truncated to text.max_length=%d tokens (further truncations are "
                    "counted, not logged): %r", body.size, self.max_length, caption[:80],
                )
            self.truncated += 1
            body = body[: self.max_length - 2]
        tokens = np.full(self.max_length, PAD, np.int32)  # (L,)
        tokens[: body.size + 2] = [BOS, *body, EOS]
        return tokens, tokens != PAD

    def encode_batch(self, captions: list[str]) -> dict[str, np.ndarray]:
        """captions -> {"text_tokens": int32 (B, L), "text_mask": bool (B, L)}."""
        tokens, masks = zip(*map(self.encode, captions), strict=True)
        return {"text_tokens": np.stack(tokens), "text_mask": np.stack(masks)}

    def count(self, caption: str) -> int:
        """Tokens of the caption, BOS and EOS included (before truncation)."""
        return len(caption.encode("utf-8")) + 2

    def decode(self, tokens: np.ndarray) -> str:
        """(L,) tokens -> the caption (special tokens dropped; cut UTF-8 sequences replaced)."""
        body = [int(t) - _BYTE_OFFSET for t in np.asarray(tokens) if t >= _BYTE_OFFSET]
        return bytes(body).decode("utf-8", errors="replace")


def make_tokenizer(text):
    """The tokenizer of a `TextConfig`: bytes, or the T5 checkpoint's own (`jaxdit.t5.T5Tokenizer`).
    Both give `encode(caption) -> (tokens, mask)` and `encode_batch(captions)`."""
    if text.encoder == "t5":
        from jaxdit.t5 import T5Tokenizer

        return T5Tokenizer(text.path, max_length=text.max_length)
    return ByteTokenizer(text.max_length)


class _EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention over the valid tokens, then an MLP."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(width, heads, implementation="auto", dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, 4 * width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask)  # (B, L, E)
        return x + self.mlp(self.norm2(x))  # (B, L, E)


class TextEncoder(nnx.Module):
    """(B, L) tokens + (B, L) mask -> (B, L, E) token features; padded positions give zeros.

    With `bigram_buckets` > 0, each pair of adjacent valid bytes adds a learned embedding (hashed into
    that many buckets) to the first one's feature, scaled by the caption's token count, so the
    masked mean the DiT pools for adaLN holds the bag's sum: every word enters the condition vector
    at full strength, as a class label does, instead of as a few bytes in a mean over the whole
    caption (which left "left" and "right" nearly the same condition; docs/quality.md).
    """

    def __init__(self, width: int, depth: int, heads: int, max_length: int, *, bigram_buckets: int = 0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"text encoder width {width} must be divisible by its {heads} heads.")
        init = nnx.initializers.normal(EMBED_STD)
        self.max_length = max_length
        self.token_embed = nnx.Embed(VOCAB_SIZE, width, embedding_init=init, rngs=rngs)
        self.position_embed = nnx.Param(init(rngs.params(), (max_length, width)))  # learned absolute positions
        self.blocks = nnx.List(_EncoderBlock(width, heads, dtype=dtype, rngs=rngs) for _ in range(depth))
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.bigram_buckets = bigram_buckets
        if bigram_buckets:
            self.bigram_embed = nnx.Embed(bigram_buckets, width, embedding_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length or mask.shape != tokens.shape:
            raise ValueError(
                f"text encoder takes tokens (B, L<= {self.max_length}) and a mask of the same shape; "
                f"got {tuple(tokens.shape)} and {tuple(mask.shape)}."
            )
        x = self.token_embed(tokens) + self.position_embed[: tokens.shape[1]]  # (B, L, E)
        for block in self.blocks:
            x = block(x, mask)  # (B, L, E)
        features = self.norm(x) * mask[..., None]  # (B, L, E)
        if self.bigram_buckets:
            features = features.at[:, :-1].add(self._bigram_bag(tokens, mask).astype(features.dtype))
        return features  # (B, L, E)

    def _bigram_bag(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """(B, L) tokens and mask -> (B, L-1, E): bigram i's embedding times the valid token count (0 where invalid)."""
        ids = (tokens[:, :-1] * VOCAB_SIZE + tokens[:, 1:]) % self.bigram_buckets  # (B, L-1)
        valid = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)  # (B, L-1)
        count = jnp.maximum(mask.sum(axis=-1), 1).astype(jnp.float32)[:, None, None]  # (B, 1, 1)
        return self.bigram_embed(ids) * valid[..., None] * count  # (B, L-1, E)
