"""Training metrics to `metrics.jsonl` and TensorBoard event files in the run's directory."""

import json
import pathlib
import time


class MetricsWriter:
    """Appends one JSON line per record and mirrors the scalars to TensorBoard (primary process)."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tensorboard = None
        if enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            from tensorboardX import SummaryWriter  # imported here: only training writes events

            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {**{k: _plain(v) for k, v in metrics.items()}, "step": step, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _plain(value):
    """NumPy / JAX scalars -> Python numbers JSON can write (NaN stays NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    return value
