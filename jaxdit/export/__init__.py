"""What a jaxdit run gives back to other tools: `python -m jaxdit.export.lora` writes a LoRA run's adapters in the
layout diffusers' `WanPipeline.load_lora_weights` reads; `python -m jaxdit.export.diffusers` writes a Wan run's
weights (fine-tuned, or with its adapters merged) as a diffusers folder that `WanPipeline.from_pretrained` reads."""
