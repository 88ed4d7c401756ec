"""DiT-XL/2 at 256x256: facebookresearch/DiT's class-conditional ImageNet model as a VideoDiT of one
frame (32x32x4 SD-VAE latents, patch 1x2x2: 256 tokens; 1000 classes + null; learned variance),
with DiT's diffusion, optimiser and sampling settings (`jaxdit.convert.dit.dit_config`).

Import the published weights and sample them (the converter writes this config into the run):

    python -m jaxdit.convert.dit DiT-XL-2-256x256.pt --variant XL/2 --image-size 256 --vae sd-vae-ft-ema --out runs/dit_xl2_256
    python sample.py --workdir runs/dit_xl2_256 --class-label 207 360 387 974 88 979 417 279 --out grid.png

Time its training step: python benchmarks/train.py --config configs/dit_xl2_256.py --latents --num-frames 1 --size 32
"""

from jaxdit.convert.dit import dit_config


def get_config():
    return dit_config("XL/2", 256, vae="runs/dit_xl2_256/codec")
