"""How often a trained moving-shapes model draws what its prompt says (colour, motion, shape, size).

    python benchmarks/prompt_adherence.py --workdir runs/shapes_tiny
    python benchmarks/prompt_adherence.py --workdir runs/shapes_tiny --cfg-scale 1 2 4 --steps 25 50

Prompts are one-object captions of the built-in data set's grammar, drawn with a fixed seed;
each generated video is judged by `jaxdit.data.judge` (which scores 100% on the real clips).
Prints one line of pass rates per (cfg scale, steps) setting, with the sampling time (compile included),
then, for the last setting, which shape the judge read for each shape asked (rows: asked; columns: read;
"-": too faint on too many frames to measure).
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
    args = parser.parse_args(argv)

    import jax

    from jaxdit.data.judge import judge_all, one_object_prompts, rates
    from jaxdit.options import resolve_sampler
    from jaxdit.pipeline import Pipeline

    pipe = Pipeline.load(args.workdir)
    captions = one_object_prompts(args.num_prompts, args.seed)
    defaults = pipe.config.sample
    print(f"{args.workdir} step {pipe.step}, {len(captions)} one-object prompts, {jax.device_count()} x {jax.devices()[0].device_kind}")
    print("sampler  steps   cfg   colour  motion   shape    size     all   seconds")
    sampler = resolve_sampler(args.sampler or defaults.sampler, pipe.config.diffusion.process)
    for cfg_scale, steps in itertools.product(args.cfg_scale or [defaults.cfg_scale], args.steps or [defaults.steps]):
        kwargs = dict(steps=steps, cfg_scale=cfg_scale, sampler=sampler, seed=args.seed)
        start = time.perf_counter()
        videos = pipe.generate(captions, **kwargs)
        seconds = time.perf_counter() - start
        verdicts = judge_all(videos, captions)
        passed = rates(verdicts)
        print(
            f"{sampler:7s} {steps:6d} {cfg_scale:5.1f}  {passed['colour']:6.2f}  {passed['direction']:6.2f}"
            f"  {passed['shape']:6.2f}  {passed['size']:6.2f}  {passed['all']:6.2f}  {seconds:8.1f}"
        )
    print(format_confusion(shape_confusion(verdicts)))
    if args.save:
        from jaxdit.video_io import write_videos

        print("wrote", write_videos(args.save, videos, captions, fps=defaults.fps))


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
