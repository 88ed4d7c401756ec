"""How often a trained moving-shapes model draws what its prompt says (colour, motion, shape, size), at
every clip shape it trained on, and from a given first frame (image-to-video).

    python benchmarks/prompt_adherence.py --workdir runs/shapes_tiny
    python benchmarks/prompt_adherence.py --workdir runs/shapes_tiny --cfg-scale 1 2 4 --steps 25 50
    python benchmarks/prompt_adherence.py --workdir runs/shapes_tiny --shapes 8x32x32 8x32x64 --no-image-to-video

Prompts are one-object captions of the built-in data set's grammar, drawn with a fixed seed (for a
still, the captions without motion); each generated video is judged by `jaxdit.data.judge` (which
scores 100% on the real clips). Prints one line of pass rates per (shape, cfg scale, steps) setting,
with the sampling time (compile included). A run trained with frame conditioning is also prompted with
the first frames of held-out clips of the first video shape and their captions: a line of the same
rates, the PSNR of each video's first frame against the given one (the smallest and the mean), and how
often the object of the second frame is where the real clip has it (continuity from the image).
Then, for the last setting, which shape the judge read for each shape asked (rows: asked; columns:
read; "-": too faint on too many frames to measure).
"""

import argparse
import itertools
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, nargs="+", help="default: the run's sample.cfg_scale")
    parser.add_argument("--steps", type=int, nargs="+", help="default: the run's sample.steps")
    parser.add_argument("--sampler", help="default: the run's sample.sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="also write the last setting's videos here (.png, .mp4, ...)")
    parser.add_argument("--shapes", nargs="+", metavar="FxHxW",
                        help="clip shapes to judge at (default: every shape the run trained on)")
    parser.add_argument("--no-image-to-video", dest="image_to_video", action="store_false",
                        help="skip the image-to-video line of a run trained with frame conditioning")
    args = parser.parse_args(argv)

    import warnings

    import jax

    from jaxdit.config import DataConfig
    from jaxdit.data.buckets import shape_name
    from jaxdit.data.judge import judge_all, one_object_prompts, rates
    from jaxdit.options import resolve_sampler
    from jaxdit.pipeline import Pipeline

    pipe = Pipeline.load(args.workdir)
    defaults = pipe.config.sample
    shapes = DataConfig(buckets=tuple(args.shapes)).buckets if args.shapes else pipe.config.data.shapes
    print(f"{args.workdir} step {pipe.step}, {args.num_prompts} one-object prompts a shape, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print("shape          sampler  steps   cfg   colour  motion   shape    size     all   seconds")
    sampler = resolve_sampler(args.sampler or defaults.sampler, pipe.config.diffusion.process)
    settings = list(itertools.product(args.cfg_scale or [defaults.cfg_scale], args.steps or [defaults.steps]))

    def report(name, captions, **given):
        for cfg_scale, steps in settings:
            start = time.perf_counter()
            with warnings.catch_warnings():  # a shape the run did not train on is what was asked for
                warnings.simplefilter("ignore", UserWarning)
                videos = pipe.generate(captions, steps=steps, cfg_scale=cfg_scale, sampler=sampler, seed=args.seed,
                                       **given)
            seconds = time.perf_counter() - start
            verdicts = judge_all(videos, captions)
            passed = rates(verdicts)
            print(
                f"{name:14s} {sampler:7s} {steps:6d} {cfg_scale:5.1f}  {passed['colour']:6.2f}  "
                f"{passed['direction']:6.2f}  {passed['shape']:6.2f}  {passed['size']:6.2f}  {passed['all']:6.2f}  "
                f"{seconds:8.1f}"
            )
        return videos, verdicts

    for frames, height, width in shapes:
        captions = one_object_prompts(args.num_prompts if frames > 1 else min(args.num_prompts, 48), args.seed,
                                      still=frames == 1)
        videos, verdicts = report(shape_name((frames, height, width)), captions, num_frames=frames, height=height,
                                  width=width)
    if args.image_to_video and pipe.config.model.frame_condition:
        moving = next((shape for shape in shapes if shape[0] > 1), None)
        if moving is not None:
            videos, verdicts, captions = image_to_video(pipe, moving, args.num_prompts, settings[-1], sampler, args.seed)
    print(format_confusion(shape_confusion(verdicts)))
    if args.save:
        from jaxdit.video_io import write_videos

        print("wrote", write_videos(args.save, videos, captions, fps=defaults.fps))


HELD_OUT_SEED = 10_000  # the data seed of the clips whose first frames prompt image-to-video (training: data.seed)
CONTINUOUS = 0.1  # a second frame's object this close to the real one's (in short sides) continues the image


def image_to_video(pipe, shape, count: int, setting, sampler: str, seed: int):
    """The first frames of `count` held-out one-object clips of `shape`, each with its caption -> videos;
    prints the judge's rates and the first frames' PSNR against the given ones. Returns (videos, verdicts, captions)."""
    import numpy as np

    from jaxdit.codec.base import psnr, to_float
    from jaxdit.data.judge import centroids, judge_all, parse_caption, rates
    from jaxdit.data.shapes import ShapesDataset

    frames, height, width = shape
    data = ShapesDataset(num_frames=frames, height=height, width=width, size=height, seed=HELD_OUT_SEED + seed)
    clips = [data[i] for i in range(count)]
    captions = [clip["caption"] for clip in clips]
    cfg_scale, steps = setting
    start = time.perf_counter()
    videos = np.concatenate([  # one image per call: one program, run once a clip
        pipe.generate(clip["caption"], image=clip["video"][0], steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                      seed=seed + i)
        for i, clip in enumerate(clips)
    ])  # (count, T, H, W, 3)
    seconds = time.perf_counter() - start
    first = np.stack([clip["video"][0] for clip in clips])  # (count, H, W, 3)
    db = np.asarray(psnr(to_float(videos[:, :1]), to_float(first[:, None])))  # (count,)
    verdicts = judge_all(videos, captions)
    passed = rates(verdicts)
    # Continuity: the object of the second frame against where the real clip has it, in short sides.
    jumps = np.array([
        np.linalg.norm(centroids(video, parse_caption(clip["caption"])[0].colour)[1]
                       - centroids(clip["video"], parse_caption(clip["caption"])[0].colour)[1]) / min(height, width)
        for video, clip in zip(videos, clips, strict=True)
    ])  # (count,), nan where the object is missing
    print(
        f"{'image-to-video':14s} {sampler:7s} {steps:6d} {cfg_scale:5.1f}  {passed['colour']:6.2f}  "
        f"{passed['direction']:6.2f}  {passed['shape']:6.2f}  {passed['size']:6.2f}  {passed['all']:6.2f}  "
        f"{seconds:8.1f}\n  first frame PSNR against the given one: min {db.min():.1f} dB, mean {db.mean():.1f} dB; "
        f"second frame's object within {CONTINUOUS:.0%} of the short side of the real clip's: "
        f"{np.mean(jumps <= CONTINUOUS):.2f} of clips (median distance {np.nanmedian(jumps):.2f})"
    )
    return videos, verdicts, captions


def shape_confusion(verdicts) -> dict[tuple[str, str | None], int]:
    """How often each asked shape was read as each shape (None: not measurable), over the judged objects."""
    from jaxdit.data.shapes import SHAPES

    counts = {(asked, read): 0 for asked in SHAPES for read in (*SHAPES, None)}
    for v in verdicts:
        if v.judged:
            counts[v.expected.shape, v.shape] += 1
    return counts


def format_confusion(counts: dict[tuple[str, str | None], int]) -> str:
    asked_shapes = list(dict.fromkeys(asked for asked, _ in counts))
    read_as = list(dict.fromkeys(read for _, read in counts))
    lines = ["shape read:  " + "".join(f"{read or '-':>9s}" for read in read_as)]
    lines += [f"{asked:>11s}  " + "".join(f"{counts[asked, read]:9d}" for read in read_as) for asked in asked_shapes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
