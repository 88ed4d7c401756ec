"""The default run's recipe (configs/shapes_tiny.py) conditioned on a frozen pretrained T5 encoder.

The DiT reads the T5's token features (its width sets model.text_dim) through cross-attention and
their masked mean through adaLN; the T5 is frozen, an argument of the step, never trained or
checkpointed. Give the folder of a transformers T5 / umT5 encoder checkpoint (config.json, the
safetensors weights and spiece.model or tokenizer.json): `google/t5-v1_1-xxl` as PixArt and
Open-Sora 1.x use it, `google/umt5-xxl` as Wan does, or the tiny random T5 the tests ship.

Run: python train.py --config configs/shapes_t5.py --text.path /models/t5-v1_1-xxl
     python train.py --config configs/shapes_t5.py --text.path tests/fixtures/t5/t5_v1_1 --train.steps 20
Cache the T5 features with the latents, so training never runs the T5:
     python -m jaxdit.data.latent_cache --config configs/shapes_t5.py --text.path DIR --out caches/t5 --num-clips 5000
"""

import dataclasses
import pathlib

from jaxdit import Config, load_config


def get_config() -> Config:
    config = load_config(pathlib.Path(__file__).with_name("shapes_tiny.py"))
    return dataclasses.replace(
        config,
        name="shapes_t5",
        # T5's captions are words, not bytes: 32 tokens hold three moving-shapes objects. The bag of
        # byte bigrams is the trained byte encoder's; a pretrained T5 already tells the words apart.
        text=dataclasses.replace(config.text, encoder="t5", max_length=32, bigram_buckets=0),
    )
