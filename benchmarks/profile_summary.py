"""Where a profiled program's device time goes: a table read from a `jax.profiler` trace.

    python benchmarks/train.py --config configs/shapes.py --profile /tmp/prof
    python benchmarks/profile_summary.py /tmp/prof                 # the newest trace under that folder
    python benchmarks/profile_summary.py /tmp/prof --top 30

Reads the Chrome-format `*trace.json.gz` that `jax.profiler.trace` writes beside its xplane, keeps the
complete ("X") events of the device (on a GPU: the kernels on its streams; on a CPU: XLA's ops on its
threads), and prints the device's busy time by kind of work (matrix products, attention, element-wise
fusions, reductions, copies, collectives) and its `--top` longest operations by total time. Busy time is
the sum of the kernels' durations, so on a GPU it says what the kernels did and, against the wall time of
the traced steps, how long the device sat idle between them. Figures are printed, never asserted.
"""

import argparse
import collections
import gzip
import json
import pathlib
import re

# Kinds of device work, matched in order against an event's name (XLA's fusion names, cuBLAS / CUTLASS /
# cuDNN kernel names, or the HLO op of a CPU thunk); the first that matches wins.
KINDS = (
    ("attention", re.compile(r"fmha|flash|cudnn|attention|sdpa|softmax", re.I)),
    # On a CPU, XLA sends matrix products (with the element-wise work fused around them) to YNNPACK.
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|matmul|dot|wgmma|convolution|conv_|conv\b|ynn", re.I)),
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("elementwise", re.compile(r"fusion|loop|elementwise|convert|multiply|add|exp|tanh", re.I)),
)


def newest_trace(folder: pathlib.Path) -> pathlib.Path:
    # jax writes HOST.trace.json.gz, and perfetto_trace.json.gz when asked: the same events.
    traces = sorted(folder.rglob("*trace.json.gz"), key=lambda p: (p.stat().st_mtime, "perfetto" not in p.name))
    if not traces:
        raise SystemExit(f"no *trace.json.gz under {folder}: was it written by jax.profiler.trace (--profile)?")
    return traces[-1]


def device_events(trace: dict) -> tuple[str, list[dict]]:
    """The complete events of the first accelerator process, else of the host's XLA threads."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in trace["traceEvents"] if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    complete = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    devices = sorted(pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)", name))
    if devices:
        pid = devices[0]
        # A GPU's kernels are on its "Stream" lines; its other lines repeat them grouped by op or module.
        on_streams = [e for e in complete if e["pid"] == pid and "stream" in threads.get((pid, e["tid"]), "").lower()]
        return names[pid], on_streams or [e for e in complete if e["pid"] == pid]
    # On a CPU, XLA's threads also carry the runtime's own spans around the ops: keep the ops (they name one).
    xla_threads = {key for key, name in threads.items() if "XLA" in name and "Client" not in name}
    ops = [e for e in complete if (e["pid"], e["tid"]) in xla_threads and "hlo_op" in e.get("args", {})]
    return "host CPU (XLA threads)", ops


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def summarise(events: list[dict], top: int) -> str:
    by_name = collections.Counter()
    counts = collections.Counter()
    for e in events:
        # A kernel's name on a GPU; on a CPU the HLO op's, whose numbering (fusion.123) is dropped so that
        # the same kind of op adds up.
        name = re.sub(r"\.\d+$", "", e["name"])
        by_name[name] += e["dur"]
        counts[name] += 1
    busy = sum(by_name.values())
    if not busy:
        return "no device events in the trace"
    by_kind = collections.Counter()
    for name, dur in by_name.items():
        by_kind[kind_of(name)] += dur
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    lines = [f"device busy {busy / 1e3:.1f} ms over a span of {span / 1e3:.1f} ms ({busy / span:.0%} busy), "
             f"{len(events)} events", "", f"{'kind':<12s} {'ms':>10s} {'share':>6s}"]
    lines += [f"{kind:<12s} {dur / 1e3:10.2f} {dur / busy:6.1%}" for kind, dur in by_kind.most_common()]
    lines += ["", f"{'ms':>10s} {'share':>6s} {'calls':>6s}  operation"]
    lines += [
        f"{dur / 1e3:10.2f} {dur / busy:6.1%} {counts[name]:6d}  {kind_of(name)}: {name[:110]}"
        for name, dur in by_name.most_common(top)
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a *.trace.json.gz, or a folder holding one (the newest is read)")
    parser.add_argument("--top", type=int, default=20, help="operations listed by total time")
    args = parser.parse_args(argv)
    path = pathlib.Path(args.path)
    path = newest_trace(path) if path.is_dir() else path
    with gzip.open(path) as file:
        trace = json.load(file)
    device, events = device_events(trace)
    print(f"{path}: {device}")
    print(summarise(events, args.top))


if __name__ == "__main__":
    main()
