"""Data sets and input pipelines: built-in moving shapes, video folders, grain loaders, latent caches."""
