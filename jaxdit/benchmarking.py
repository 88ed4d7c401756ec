"""What the speed benchmarks (benchmarks/train.py, benchmarks/sample.py) share: the config from a
file, named flags and overrides; what a measured rate means on the devices (TFLOP/s, MFU, peak
memory); a record printed as a table and appended as one JSON line. Figures are printed, never asserted.
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


def describe(benchmark: str, config, devices: int, tokens: int) -> dict:
    """The head of a record: which benchmark, config and model ran, on what, and the self-attention
    implementation that ran over its `tokens` space-time tokens (the model's own choice under "auto")."""
    import jax

    from jaxdit.attention import resolve_implementation

    model = config.model
    attention = resolve_implementation(model.attention, model.dtype, model.width // model.heads, (tokens, tokens))
    return {
        "benchmark": benchmark, "config": config.name, "variant": model.variant,
        "device": jax.devices()[0].device_kind, "devices": devices, "attention": attention,
    }


def rate_figures(flops_per_item: float, items_per_s: float, devices: int) -> dict:
    """What a measured rate means on these devices: TFLOP/s, the peak, MFU (None off a known peak),
    peak memory, and the jax and backend that ran it; the tail of both benchmarks' records."""
    import jax

    from jaxdit import flops

    kind = jax.devices()[0].device_kind
    return {
        "tflops_per_s": flops_per_item * items_per_s / 1e12,
        "peak_tflops_per_device": flops.peak_tflops(kind),
        "mfu": flops.model_flops_utilization(flops_per_item, items_per_s, devices, kind),
        "peak_memory_bytes": peak_memory_bytes(jax.local_devices()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


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
