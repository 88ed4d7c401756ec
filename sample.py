"""Generate videos from prompts with a trained run.

    python sample.py --workdir runs/shapes_tiny --prompt "a large red circle moving left" --out red.mp4
    python sample.py --workdir runs/shapes_tiny --prompts-file prompts.txt --num-samples 4 --out grid.png
    python sample.py --workdir runs/shapes_tiny --prompt "a large red circle moving left" --height 32 --width 64 --out wide.mp4
    python sample.py --workdir runs/shapes_tiny --prompt "a large red circle moving left" --num-frames 1 --out still.png
    python sample.py --workdir runs/shapes_tiny --prompt "a large blue circle moving left" --edit red.mp4 --strength 0.6 --out blue.mp4
    python sample.py --workdir runs/shapes_tiny --prompt "a large red circle moving left" --image first.png --out i2v.mp4
    python sample.py --workdir runs/shapes_tiny --prompt "a large red circle moving left" --video red.mp4 --out next.mp4

The extension of --out picks the format: .mp4 and .gif (every sample playing at once, a row
per prompt), .png (a row of frames per sample, its prompt above), .npy (the uint8 array
(prompts * samples, T, H, W, 3), prompts in order, the samples of a prompt adjacent).
Unset options come from the run's `sample` config; the frames and size from its `data` config (any
other that the patch and codec divide works, with a warning if the run did not train on it; one frame
is an image). --image, --last-image and --video prompt a run trained with frame conditioning with the
frames every video begins or ends with (docs/generation.md). --fsdp, --context, --param-dtype and --dtype
fit a large model on several devices (docs/generation.md). A LoRA run (train.lora_rank) samples with its
adapters applied to its base weights, or folded into them with --merge-lora (docs/wan.md). The same seed gives
the same pixels on any number of devices. A class-conditional model (no text) takes class indices, as --class-label 207 360
(or as prompts); an imported DiT (python -m jaxdit.convert.dit) so:

    python sample.py --workdir runs/dit_xl2_256 --class-label 207 360 387 974 88 979 417 279 --out grid.png

and Wan 2.1 converted from its diffusers folder (python -m jaxdit.convert.wan, docs/wan.md) so:

    python sample.py --workdir runs/wan21_t2v_1.3b --prompt "A cat walks on the grass, realistic style" \
        --negative-prompt "blurry, low quality" --height 480 --width 832 --num-frames 81 --sampler unipc --out cat.mp4
"""

import argparse
import logging
import pathlib
import sys


def read_prompts(args, parser) -> list[str]:
    prompts = list(args.prompt) + [str(label) for label in args.class_label]
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"cannot read --prompts-file {str(path)!r}: {error}")
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        parser.error("give at least one --prompt (or --class-label), or a --prompts-file with one prompt per line.")
    return prompts


def read_clip(args, parser, flag: str, path: str, num_frames: int | None = None):
    """The clip (or image) a flag names, uint8 (T, H, W, 3): its first `num_frames` frames (all: None),
    resized to --height/--width (or --size) when given, else as it is."""
    from jaxdit.data.video_folder import UnusableVideo, read_video, resize_crop

    try:
        clip = read_video(path, num_frames)
    except UnusableVideo as error:
        parser.error(f"cannot read {flag} {path!r}: {error}")
    height, width = (args.size, args.size) if args.size else (args.height, args.width)
    if height or width:
        clip = resize_crop(clip, height or clip.shape[1], width or clip.shape[2])
    return clip


def read_references(args, parser) -> dict:
    """--image, --last-image and --video as Pipeline.generate takes them."""
    references = {}
    if args.image:
        references["image"] = read_clip(args, parser, "--image", args.image, 1)[0]  # (H, W, 3)
    if args.last_image:
        references["last_image"] = read_clip(args, parser, "--last-image", args.last_image, 1)[0]
    if args.video:
        references["video"] = read_clip(args, parser, "--video", args.video)  # (T, H, W, 3)
    elif args.backward:
        parser.error("--backward generates what came before a clip: give it with --video PATH.")
    if references and args.edit:
        parser.error("give frames to keep (--image, --last-image, --video) or a clip to --edit, not both.")
    return references


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate videos from prompts with a trained jaxdit run.")
    parser.add_argument("--workdir", required=True, help="the run's folder (train.py's --workdir)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (# comments skipped)")
    parser.add_argument("--class-label", type=int, nargs="+", default=[], metavar="K",
                        help="class indices, for a class-conditional model (e.g. DiT's ImageNet: 207 360 387)")
    parser.add_argument("--out", required=True, help="output path: .mp4, .gif, .png or .npy")
    parser.add_argument("--num-samples", type=int, default=1, help="videos per prompt (default: 1)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the run's sample.steps)")
    parser.add_argument("--sampler", help="ddim or ddpm for DDPM runs, euler, heun or unipc for flow runs (default: the "
                                          "run's sample.sampler)")
    parser.add_argument("--negative-prompt", metavar="TEXT",
                        help="the caption guidance steers away from, instead of the empty one (default: the run's "
                             "sample.negative_prompt)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance; 1 turns it off")
    parser.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic (default: the run's sample.eta)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, help="the checkpoint step to load (default: the newest)")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: the run's first clip shape)")
    parser.add_argument("--height", type=int, help="frame height in pixels (default: the run's first clip shape)")
    parser.add_argument("--width", type=int, help="frame width in pixels (default: the run's first clip shape)")
    parser.add_argument("--size", type=int, help="a square frame: --height S --width S")
    parser.add_argument("--batch-size", type=int, help="samples per forward pass (default: all at once)")
    parser.add_argument("--text-path", help="a text.encoder='t5' run's encoder folder, when it moved since training")
    parser.add_argument("--context", type=int, default=1,
                        help="split each video's tokens over this many devices (context parallelism, for long "
                             "videos); it must divide the local devices (default: 1)")
    parser.add_argument("--fsdp", type=int, default=1,
                        help="split the model's parameters over this many devices (FSDP), for models too large for "
                             "one device's memory; --fsdp x --context must divide the local devices (default: 1)")
    parser.add_argument("--param-dtype", default="float32", metavar="DTYPE",
                        help="the dtype the parameters are kept in on the devices: bfloat16 halves their memory "
                             "(default: float32)")
    parser.add_argument("--dtype", metavar="DTYPE",
                        help="the model's computation dtype, float32 or bfloat16 (default: the run's model.dtype)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run (train.lora_rank): fold its adapters into the base weights before sampling, "
                             "which then costs what the base model does (default: apply them as they are)")
    parser.add_argument("--fps", type=float, help="frames per second of .mp4/.gif (default: the run's sample.fps)")
    parser.add_argument("--edit", metavar="PATH",
                        help="SDEdit: a video, image or .npy clip to redraw with the prompt (its first --num-frames "
                             "frames, resized to --height/--width when given; else all of it, as it is)")
    parser.add_argument("--strength", type=float,
                        help="with --edit: the share of the denoising path rerun, in (0, 1]: 1 ignores the clip, "
                             "near 0 keeps it (default: 0.8)")
    parser.add_argument("--image", metavar="PATH",
                        help="image-to-video: the first frame of every video (an image, or a video's first frame)")
    parser.add_argument("--last-image", metavar="PATH",
                        help="the last frame of every video; with --image, a clip that connects the two (the same "
                             "image twice: a loop)")
    parser.add_argument("--video", metavar="PATH",
                        help="continue this clip: its last frames begin every video (with --backward, its first "
                             "frames end every video: what came before it)")
    parser.add_argument("--backward", action="store_true", help="with --video: generate what came before the clip")
    parser.add_argument("--debug", action="store_true", help="raise errors with their traceback instead of a message")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only directories

    from jaxdit.video_io import check_output_path, write_videos

    try:
        out = check_output_path(args.out)
    except ValueError as error:
        parser.error(str(error))
    prompts = read_prompts(args, parser)
    if args.num_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--num-samples and --batch-size must be at least 1.")
    if args.size is not None and (args.height is not None or args.width is not None):
        parser.error("give --size (a square) or --height and --width, not both.")

    from jaxdit.pipeline import Pipeline

    edit = read_clip(args, parser, "--edit", args.edit, args.num_frames) if args.edit else None
    references = read_references(args, parser)
    given_size = edit is not None or bool(references)  # the clip or image gives the size (resized above if asked)

    try:
        pipe = Pipeline.load(
            args.workdir, step=args.step, context=args.context, fsdp=args.fsdp, param_dtype=args.param_dtype,
            dtype=args.dtype, text_path=args.text_path, merge_lora=args.merge_lora,
        )
        model = pipe.config.model
        if args.class_label and (not model.num_classes or model.has_text):
            parser.error(f"--class-label needs a class-conditional model without text; {args.workdir} "
                         f"has num_classes={model.num_classes}, text_dim={model.text_dim}: give --prompt instead.")
        videos = pipe.generate(
            prompts, num_samples=args.num_samples, steps=args.steps, sampler=args.sampler,
            cfg_scale=args.cfg_scale, eta=args.eta, seed=args.seed, num_frames=args.num_frames,
            height=None if given_size else args.height, width=None if given_size else args.width,
            size=None if given_size else args.size, batch_size=args.batch_size, progress=True,
            edit=edit, **({} if args.strength is None else {"strength": args.strength}), **references,
            backward=args.backward, negative_prompt=args.negative_prompt,
        )  # (P * S, T, H, W, 3) uint8
    except (FileNotFoundError, ValueError) as error:  # a missing run, a damaged checkpoint, a bad setting
        if args.debug:
            raise
        parser.error(str(error))
    fps = args.fps or pipe.config.sample.fps
    shown = [f"class {p}" for p in prompts] if args.class_label else prompts
    repeated = [p for p in shown for _ in range(args.num_samples)]
    write_videos(out, videos, repeated, fps=fps, num_samples=args.num_samples)
    print(f"wrote {len(videos)} videos {tuple(videos.shape[1:4])} to {out} (step {pipe.step} of {args.workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
