"""The linear (PCA) codec's fit command: fits `jaxdit.codec.pca.LinearCodec` to a config's clips
and saves it as a codec directory.

    python -m jaxdit.codec.linear --config configs/shapes_tiny.py --out codecs/pca --patch 4 --channels 8

It reads data (`jaxdit.data.pipeline`), so it lives apart from the codec (`jaxdit.codec.pca`):
the codec registry, which the data layer reaches through a latent cache's codec record, builds
codecs without importing data.
"""

import argparse

import numpy as np

from jaxdit.codec.pca import LinearCodec, fit  # noqa: F401 (the codec and its fit, where they used to live)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Fit a linear (PCA) codec to a config's clips and save it.")
    parser.add_argument("--config", required=True, help="a configs/*.py file: its data section gives the clips")
    parser.add_argument("--out", required=True, help="the codec directory to write (jaxdit.codec.load reads it)")
    parser.add_argument("--patch", type=int, default=4, help="patch side in pixels: the spatial compression")
    parser.add_argument("--channels", type=int, default=8, help="principal components kept per patch")
    parser.add_argument("--num-clips", type=int, default=256, help="clips the PCA is fitted on")
    args, overrides = parser.parse_known_args(argv)

    from jaxdit.codec.directory import save
    from jaxdit.config import apply_overrides, load_config
    from jaxdit.data.pipeline import make_source

    config = apply_overrides(load_config(args.config), overrides)
    source = make_source(config.data)
    count = min(args.num_clips, len(source))
    videos = np.stack([source[i]["video"] for i in range(count)])  # (N, T, H, W, 3)
    try:
        codec = fit(videos, patch=args.patch, channels=args.channels)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    directory = save(codec, args.out, fitted_on=f"{count} clips of {args.config}")
    print(
        f"linear codec ({args.patch}x{args.patch} patches, {args.channels} channels) fitted on {count} clips "
        f"into {directory}; train on it with --codec.kind saved --codec.path {args.out} "
        f"--model.in_channels {args.channels}"
    )


if __name__ == "__main__":
    main()
