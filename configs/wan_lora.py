"""LoRA on Wan 2.1 text-to-video 1.3B: configs/wan_finetune.py with low-rank adapters in place of every weight.

    python -m jaxdit.convert.wan Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_t2v_1.3b
    python train.py --config configs/wan_lora.py --data.manifest my/videos.csv           # -> runs/wan_lora/
    python sample.py --workdir runs/wan_lora --prompt "A cat walks on the grass, realistic style" --out cat.mp4
    python -m jaxdit.export.lora runs/wan_lora --out wan_lora.safetensors   # for diffusers' load_lora_weights

Everything is wan_finetune.py's (the data, buckets, schedule, computation and sampling) except what trains:
rank-32 adapters (alpha 32: a factor of 1) on the query, key, value and output projections of self- and
cross-attention, as diffusers' and finetrainers' Wan LoRA recipes target them, at a LoRA's usual learning
rate of 1e-4. The optimizer, the EMA and the checkpoints hold only the adapters (23.6 M numbers for
1.3B); the base weights stay frozen in bfloat16 (`train.lora_base_dtype`), read from train.init_from at
every start. Add "mlp" to lora_targets to adapt the feed-forward layers too. Memory per device, by XLA's
estimate for an 81-frame clip at rank 64 on attn,cross,mlp: 16.2 GiB on one device, 5.2 GiB on 8 at
--train.fsdp 2 --train.context 4 (docs/wan.md).
"""

import dataclasses
import pathlib

from jaxdit.config import Config, load_config


def get_config() -> Config:
    config = load_config(pathlib.Path(__file__).with_name("wan_finetune.py"))
    train = dataclasses.replace(
        config.train, learning_rate=1e-4, lora_rank=32, lora_alpha=32.0, lora_targets="attn,cross",
        lora_base_dtype="bfloat16",
    )
    return dataclasses.replace(config, name="wan_lora", train=train)
