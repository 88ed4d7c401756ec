"""What a jaxdit run gives back to other tools: `python -m jaxdit.export.lora` writes a LoRA run's adapters in the
layout diffusers' `WanPipeline.load_lora_weights` reads."""
