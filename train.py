"""Train a jaxdit model.

    python train.py                                   # configs/shapes_tiny.py into runs/shapes_tiny/
    python train.py --config configs/shapes.py --workdir runs/shapes --train.steps 20000

Any config field can be set as `--section.field VALUE` (e.g. `--train.batch_size 64`,
`--model.variant B/2x2x2`, `--data.shuffle false`). Running the same command again resumes
from the newest checkpoint in the workdir. Ctrl-C (or SIGTERM) checkpoints and stops.

Several processes (multi-host): on a TPU pod slice run the same command on every worker
(`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd jaxdit && python train.py ..."`);
on GPU hosts set JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i in each.
"""

import argparse
import logging
import pathlib
import sys
import traceback

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "shapes_tiny.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a jaxdit text-to-video DiT.",
        epilog="Override any config field with --section.field VALUE, e.g. --train.steps 200.",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a configs/*.py file (default: %(default)s)")
    parser.add_argument("--workdir", help="checkpoints, metrics and samples go here (default: runs/<config name>)")
    parser.add_argument("--debug", action="store_true",
                        help="raise errors with their traceback instead of a message (it is always in WORKDIR/train.log)")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter

    import jax

    from jaxdit.checkpoint import CheckpointError
    from jaxdit.config import ConfigError, apply_overrides, load_config
    from jaxdit.sharding import initialize_distributed
    from jaxdit.train_loop import train

    initialize_distributed()  # before any computation: joins the other processes of a multi-host run
    try:
        config = apply_overrides(load_config(args.config), overrides)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / config.name)
    process = jax.process_index()
    log_file = _log_to(workdir / ("train.log" if process == 0 else f"train.process_{process}.log"))
    try:
        metrics = train(config, workdir)
    except (ConfigError, CheckpointError, OSError, ValueError) as error:
        # What a user causes (a config that cannot run here, a missing manifest, an unreadable folder, damaged
        # checkpoints, a full disk) is one paragraph; the traceback goes to the log file, or with --debug here.
        with open(log_file.baseFilename, "a") as log:
            log.write(traceback.format_exc())
        if args.debug:
            raise
        parser.error(f"{error}\n(the traceback is in {log_file.baseFilename}; --debug prints it)")
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    if config.train.compile_only:
        print(f"compiled the train step for each of the {len(config.data.shapes)} clip shape(s) (the log gives time and "
              "memory); nothing trained")
    elif metrics:
        samples = f"; sample videos in {workdir / 'samples'}" if config.sample.prompts else ""
        print(f"step {metrics['step']} of {config.train.steps}, loss {metrics['loss']:.4f}; run in {workdir}{samples}")
    return 0


def _log_to(path: pathlib.Path) -> logging.FileHandler:
    """Also writes the log to `path` (a run's train.log, appended to across resumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


if __name__ == "__main__":
    sys.exit(main())
