"""DiT-XL/2 at 512x512: as configs/dit_xl2_256.py with 64x64x4 latents (1024 tokens).

    python -m jaxdit.convert.dit DiT-XL-2-512x512.pt --variant XL/2 --image-size 512 --vae sd-vae-ft-ema --out runs/dit_xl2_512
    python sample.py --workdir runs/dit_xl2_512 --class-label 207 360 387 974 --out grid.png
"""

from jaxdit.convert.dit import dit_config


def get_config():
    return dit_config("XL/2", 512, vae="runs/dit_xl2_512/codec")
