import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit.text import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer, TextEncoder


@pytest.mark.parametrize("caption", ["a small red circle moving left", "", "vidéo – 動画 🎬"])
def test_tokenizer_round_trip(caption):
    tokenizer = ByteTokenizer(max_length=64)
    tokens, mask = tokenizer.encode(caption)
    chex.assert_shape((tokens, mask), (64,))
    assert tokens.dtype == np.int32 and mask.dtype == bool
    length = len(caption.encode()) + 2
    assert tokens[0] == BOS and tokens[length - 1] == EOS and (tokens[length:] == PAD).all()
    np.testing.assert_array_equal(mask, np.arange(64) < length)
    assert tokens.max() < VOCAB_SIZE
    assert tokenizer.decode(tokens) == caption
    assert tokenizer.truncated == 0


def test_truncation_is_counted_and_logged_once(caplog):
    tokenizer = ByteTokenizer(max_length=10)
    with caplog.at_level(logging.WARNING):
        batch = tokenizer.encode_batch(["a large blue square moving up", "short", "another long caption here"])
    assert tokenizer.truncated == 2
    assert sum("truncated" in r.message for r in caplog.records) == 1
    chex.assert_shape((batch["text_tokens"], batch["text_mask"]), (3, 10))
    assert tokenizer.decode(batch["text_tokens"][0]) == "a large "  # the first 8 bytes
    assert batch["text_tokens"][0, -1] == EOS and batch["text_mask"][0].all()
    assert tokenizer.decode(batch["text_tokens"][1]) == "short"


def test_tokenizer_rejects_a_length_with_no_room():
    with pytest.raises(ValueError, match="text.max_length"):
        ByteTokenizer(max_length=2)


def test_encoder_shapes_and_padding():
    tokenizer = ByteTokenizer(max_length=24)
    encoder = TextEncoder(32, 2, 4, 24, rngs=nnx.Rngs(0))
    batch = tokenizer.encode_batch(["a small red circle moving left", "", "a large cyan square moving up"])
    features = jax.jit(lambda s, t, m: nnx.merge(nnx.graphdef(encoder), s)(t, m))(
        nnx.state(encoder), batch["text_tokens"], batch["text_mask"]
    )
    chex.assert_shape(features, (3, 24, 32))
    chex.assert_tree_all_finite(features)
    np.testing.assert_array_equal(features[~batch["text_mask"]], 0.0)  # padded positions are zero
    # Different captions give different features; padding content does not matter.
    assert not np.allclose(features[0], features[2])
    garbage = jnp.where(batch["text_mask"], batch["text_tokens"], 77)
    np.testing.assert_allclose(encoder(garbage, batch["text_mask"]), features, atol=1e-5)


def test_encoder_rejects_too_long_input():
    encoder = TextEncoder(16, 1, 2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="L<= 8"):
        encoder(jnp.zeros((1, 9), jnp.int32), jnp.ones((1, 9), bool))


def test_bigram_bag_puts_the_sum_of_the_captions_bigrams_in_the_pooled_features():
    tokenizer = ByteTokenizer(max_length=40)
    batch = tokenizer.encode_batch(["a large red circle moving left", "a large red circle moving right", ""])
    tokens, mask = jnp.asarray(batch["text_tokens"]), jnp.asarray(batch["text_mask"])
    bag = TextEncoder(16, 1, 2, 40, bigram_buckets=97, rngs=nnx.Rngs(0))
    plain = TextEncoder(16, 1, 2, 40, rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.State({k: v for k, v in nnx.state(bag, nnx.Param).items() if k != "bigram_embed"}))
    features, base = bag(tokens, mask), plain(tokens, mask)
    np.testing.assert_array_equal(np.asarray(features)[~np.asarray(mask)], 0.0)  # padding stays zero
    table = np.asarray(bag.bigram_embed.embedding[...])
    pool = lambda f: np.asarray((f * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))  # the DiT's masked mean
    for b in range(3):
        pairs = zip(tokens[b, :-1], tokens[b, 1:], mask[b, 1:], strict=True)
        ids = [(int(x) * VOCAB_SIZE + int(y)) % 97 for x, y, m in pairs if m]
        np.testing.assert_allclose(pool(features)[b] - pool(base)[b], table[ids].sum(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="bigram_buckets is for the trained byte encoder"):
        __import__("jaxdit").TextConfig(encoder="t5", bigram_buckets=8)
