"""What the speed benchmarks (benchmarks/train.py, benchmarks/sample.py) share: the config from a
file, named flags and overrides; the devices' peak memory; a record printed as a table and
appended as one JSON line. Figures are printed, never asserted.
"""

import datetime
import json
import pathlib


def build_config(config_file: str, overrides: list[str], named: dict):
    """The config of `config_file` with `--section.field VALUE` overrides, then the benchmark's named
    flags (`{"train.batch_size": 64, ...}`, None where not given); returns (config, the flags applied)."""
    from jaxdit.config import apply_overrides, load_config

    flags = list(overrides) + [part for key, value in named.items() if value is not None for part in (f"--{key}", str(value))]
    return apply_overrides(load_config(config_file), flags), flags


def peak_memory_bytes(devices) -> int | None:
    """The most memory any device has held, from its allocator; None where it does not say (CPU)."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def report(record: dict, *, config_file: str, flags: list[str], out: str | None) -> dict:
    """Adds where the figures came from, prints them as a table, appends them to `out` as a JSON line."""
    record = record | {"config_file": config_file, "overrides": flags, "time": datetime.datetime.now().isoformat(timespec="seconds")}
    width = max(map(len, record))
    for name, value in record.items():
        shown = f"{value:.4g}" if isinstance(value, float) else "n/a" if value is None else str(value)
        print(f"{name:<{width}}  {shown}")
    if out:
        with pathlib.Path(out).open("a") as file:
            file.write(json.dumps(record) + "\n")
    return record
