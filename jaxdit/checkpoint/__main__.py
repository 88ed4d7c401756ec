"""Check every checkpoint of a run: python -m jaxdit.checkpoint verify RUN

Lists each checkpoint of RUN (a run folder, or its checkpoints/ folder) with its step, its size and
whether it reads completely, with the reason when it does not; checkpoints moved aside
(`STEP.damaged`) and saves that never committed are listed too. The exit status is 1 when the newest
checkpoint is damaged (a resume or sample.py would fall back to an older one), 2 when there is none.
"""

import argparse
import pathlib
import sys

from jaxdit.checkpoint.verify import IMPORT_RECORD, folder_size, read_problem


def checkpoint_folders(run) -> pathlib.Path:
    """RUN's checkpoints folder: RUN/checkpoints, or RUN itself when it holds step folders."""
    run = pathlib.Path(run)
    if (run / "checkpoints").is_dir():
        return run / "checkpoints"
    if run.is_dir() and any(p.name.isdigit() for p in run.iterdir()):
        return run
    raise FileNotFoundError(f"no checkpoints in {str(run)!r}: give a run folder (e.g. runs/shapes_tiny) or its checkpoints/.")


def verify(run) -> tuple[list[str], int]:
    """The report's lines and the exit status."""
    directory = checkpoint_folders(run)
    steps = sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    lines = [f"{'step':>10}  {'size':>10}  status"]
    problems = {}
    for folder in steps:
        problems[folder.name] = read_problem(folder)
        status = "reads completely" if problems[folder.name] is None else f"DAMAGED: {problems[folder.name]}"
        lines.append(f"{folder.name:>10}  {_size(folder):>10}  {status}")
    for folder in sorted(p for p in directory.iterdir() if not p.name.isdigit() and p.is_dir()):
        note = "moved aside as damaged" if ".damaged" in folder.name else "not committed (a save that was cut off)"
        lines.append(f"{folder.name:>10}  {_size(folder):>10}  {note}: never restored")
    if not steps:
        return lines + [f"no complete checkpoint in {directory}"], 2
    newest = steps[-1].name
    good = [s.name for s in steps if problems[s.name] is None]
    if problems[newest] is None:
        imported = (directory.parent / IMPORT_RECORD).is_file()  # weights for sampling: nothing to resume
        return lines + [f"the newest checkpoint, {newest}, reads: {'sampling' if imported else 'a resume'} starts there"], 0
    fallback = f"a resume falls back to {good[-1]}" if good else "no checkpoint reads: nothing to resume from"
    return lines + [f"the newest checkpoint, {newest}, is damaged: {fallback}"], 1


def _size(folder: pathlib.Path) -> str:
    size = folder_size(folder)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdit.checkpoint", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="read every checkpoint of a run completely and report each")
    check.add_argument("run", help="a run folder (e.g. runs/shapes_tiny) or its checkpoints/ folder")
    args = parser.parse_args(argv)
    try:
        lines, status = verify(args.run)
    except FileNotFoundError as error:
        parser.error(str(error))
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
