#!/usr/bin/env python
"""Host memory of building megamm's model on N ranks: partitioned under ZeRO-3 against built whole.

Each measurement is one job of the real ``deepspeed`` launcher on 127.0.0.1 (gloo, CPU) whose every
rank builds megamm's ``MultiModalTransformer`` exactly as training does
(``megamm.train._build_model``) and reports:

* its peak resident memory during the build: the kernel's high-water mark (``VmHWM``), reset right
  before the build (``/proc/self/clear_refs``), minus the resident memory just before it (after the
  imports, the process group and the DeepSpeed config): what building the model cost this rank;
* the parameter bytes it still holds afterwards (its ZeRO-3 partitions, or its whole shard);
* the most parameter storage it held at any moment of the build, sampled every time a module
  registers a parameter (whole tensors plus ZeRO-3 partitions; the transient master weight a
  tensor-parallel layer draws and slices is not a parameter, so only RSS sees it).

Two builds, each at every ``--tensor-parallel`` size: **zero_init**, ZeRO-3 on ``--ranks`` ranks with
the model built in ``megamm.engine.model_construction`` (DeepSpeed's ``zero.Init``: each module's
parameters are partitioned over the data-parallel group as its constructor returns), and **plain**,
the model built whole on every rank (as without zero.Init; ZeRO would partition it only afterwards,
in the engine). A plain build's per-rank memory does not depend on the number of ranks (every rank
builds its whole tensor-parallel shard), so it runs on fewer ranks when ``--ranks`` of them would not
fit in this machine's memory (``--plain-ranks auto``); the report says how many ran.

glibc's allocator matters here: by default it raises its mmap threshold (up to 32 MB) each time a
large block is freed, after which the layers' transient master weights come from the heap, between
the partitions that stay, and their freed pages are not handed back. Each build therefore runs
under every ``--malloc-mmap-threshold`` given: 0 leaves glibc's default, a number fixes
``MALLOC_MMAP_THRESHOLD_`` (bytes) for the ranks, so that every block above it is mapped and
unmapped on its own. The RSS after a ``malloc_trim(0)`` at the end shows what was only freed memory
glibc kept.

    python tools/measure_build_memory.py --hidden 2048 --layers 10 --ranks 4 --tensor-parallel 1 2 \\
        --malloc-mmap-threshold 0 1048576 --repeats 3 --out docs/benchmarks/build_memory

Results: ``results.md`` (printed too), ``results.json`` and ``logs/`` under ``--out``. MB are 10^6
bytes, GB 10^9; the full model's bytes are its fp32 parameters at tensor_parallel=1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.config import TrainConfig, load_config  # noqa: E402
from tools.jobs import run_launch  # noqa: E402

MB, GB = 1e6, 1e9
HEAD_DIM = 64
MODES = ("zero_init", "plain")
LABELS = {"zero_init": "ZeRO-3, built under zero.Init", "plain": "built whole (no zero.Init)"}


# ----------------------------------------------------------------------------------------------
# The model


def shape_overrides(hidden: int, layers: int) -> list[str]:
    """Both towers ``hidden`` wide (heads of 64) and ``layers`` deep."""
    heads = max(1, hidden // HEAD_DIM)
    return [
        f"model.{tower}.{key}={value}"
        for tower in ("text", "image")
        for key, value in (("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads))
    ]


def model_sizes(config: TrainConfig) -> dict[str, int]:
    """Parameters of the whole model (tensor_parallel=1) and the bytes of its largest layer (the
    most fp32 bytes one module creates itself), counted on the meta device."""
    from megamm.model import MultiModalTransformer

    with torch.device("meta"):
        model = MultiModalTransformer(config.model, seed=0)
    layer = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return {"params": sum(p.numel() for p in model.parameters()), "largest_layer_bytes": 4 * layer}


# ----------------------------------------------------------------------------------------------
# Memory of this process


def status_bytes(field: str) -> int:
    """``VmRSS``, ``VmHWM``, ...: a field of /proc/self/status, in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_bytes("VmHWM") <= status_bytes("VmRSS") + 4 * 2**20


class HeldParameters:
    """The parameter storage this process holds, sampled whenever a module registers a parameter:
    whole tensors (``param.data``; a ZeRO-3 placeholder holds none) plus ZeRO-3 partitions."""

    def __init__(self) -> None:
        self.params: dict[int, weakref.ref] = {}
        self.peak = 0

    def sample(self, module: Any, name: str, param: Any) -> None:
        if param is not None:
            self.params[id(param)] = weakref.ref(param)
        live = [p for p in (ref() for ref in self.params.values()) if p is not None]
        held = sum(p.data.untyped_storage().nbytes() for p in live)
        held += sum(p.ds_tensor.untyped_storage().nbytes() for p in live if hasattr(p, "ds_tensor"))
        self.peak = max(self.peak, held)


def malloc_trim() -> bool:
    """Hand the allocator's free memory back to the system (glibc's ``malloc_trim(0)``); False elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def held_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds now: ZeRO-3 partitions, or whole tensors."""
    total = 0
    for param in model.parameters():
        total += param.data.untyped_storage().nbytes()
        if hasattr(param, "ds_tensor"):
            total += param.ds_tensor.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------------------------
# The job (runs on every rank)


def worker_main(args: argparse.Namespace) -> None:
    """Build the model once on this rank, measuring; rank 0 writes every rank's record."""
    import logging

    import torch.distributed as dist

    from megamm.engine import build_ds_config, init_distributed, load_template
    from megamm.parallel import ParallelState
    from megamm.train import _build_model

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    init_distributed()
    parallel = ParallelState.initialize(config.parallel.tensor_parallel)
    ds_config = build_ds_config(load_template(args.ds_config), config, parallel.dp_size)
    zero_init = args.mode == "zero_init"
    if zero_init and ds_config["zero_optimization"]["stage"] != 3:
        raise SystemExit(f"expected ZeRO-3, the DeepSpeed config runs stage {ds_config['zero_optimization']['stage']}")
    gc.collect()
    dist.barrier()
    baseline = status_bytes("VmRSS")
    peak_reset = reset_peak()
    held = HeldParameters()
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(held.sample)
    start = time.perf_counter()
    model = _build_model(config, parallel, ds_config if zero_init else None)
    seconds = time.perf_counter() - start
    handle.remove()
    peak, after = status_bytes("VmHWM"), status_bytes("VmRSS")
    trimmed = status_bytes("VmRSS") if malloc_trim() else after
    record = {
        "rank": parallel.rank,
        "tp_rank": parallel.tp_rank,
        "dp_rank": parallel.dp_rank,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "rss_after": after,
        "peak_growth": peak - baseline,
        "growth_after": after - baseline,
        "growth_after_trim": trimmed - baseline,
        "held_after": held_bytes(model),
        "peak_held": held.peak,
        "partitioned": all(hasattr(p, "ds_tensor") for p in model.parameters()),
        "build_seconds": seconds,
        "peak_reset": peak_reset,
    }
    records: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(records, record)
    if parallel.rank == 0:
        layout = {"ranks": parallel.world_size, "tp": parallel.tp_size, "dp": parallel.dp_size}
        Path(args.result).write_text(json.dumps({"layout": layout, "ranks": records}, indent=1))
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# The parent: launch the jobs, summarise, print and write


def run_job(args: argparse.Namespace, mode: str, ranks: int, mmap_threshold: int, overrides: list[str], result: Path,
            log_path: Path) -> Optional[dict[str, Any]]:  # fmt: skip
    """One launch of ``ranks`` ranks building the model in ``mode`` (with glibc's mmap threshold fixed
    at ``mmap_threshold`` bytes, or glibc's default for 0); its result, or None if it failed."""
    from megamm.engine import free_port

    port = free_port("127.0.0.1")
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(ROOT / "tools/measure_build_memory.py"), "--worker", "--mode", mode, "--result", str(result),
               "--config", args.config, "--ds-config", args.ds_config, *overrides]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    returncode = run_launch(command, env, log_path, args.timeout, port)
    if returncode != 0 or not result.is_file():
        print(f"the {mode} job on {ranks} ranks failed with exit {returncode}; see {log_path}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def plain_ranks(requested: str, ranks: int, tp: int, full_bytes: int) -> tuple[int, str]:
    """Ranks for the plain build at tensor-parallel size ``tp``, and why. ``auto``: ``ranks``, or the
    most (a multiple of ``tp`` dividing ``ranks``) whose whole shards fit in 3/4 of the available memory."""
    if requested != "auto":
        return int(requested), "as --plain-ranks asks"
    per_rank = full_bytes / tp * 1.25 + 0.8 * GB  # the shard, the layer being drawn, the imports
    budget = 0.75 * available_bytes()
    for count in range(ranks, tp - 1, -1):
        if ranks % count == 0 and count % tp == 0 and count * per_rank <= budget:
            why = "" if count == ranks else (
                f"{ranks} ranks would need ~{ranks * per_rank / GB:.0f} GB, more than 3/4 of the "
                f"{available_bytes() / GB:.0f} GB available; a plain build's per-rank memory does not depend on the "
                "number of ranks"
            )
            return count, why
    return tp, "even the fewest ranks may not fit; trying anyway"


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


FIELDS = ("peak_growth", "growth_after", "growth_after_trim", "held_after", "peak_held", "build_seconds")


def summarise(runs: list[dict[str, Any]], full_bytes: int, layer_bytes: int, mmap_threshold: int) -> dict[str, Any]:
    """Per rank and over all ranks: each field's mean, std, min and max over the repeats."""
    ranks = len(runs[0]["ranks"])
    per_rank = []
    for rank in range(ranks):
        records = [run["ranks"][rank] for run in runs]
        per_rank.append({"rank": rank, **{field: _stats([r[field] for r in records]) for field in FIELDS}})
    worst = [max(r["peak_growth"] for r in run["ranks"]) for run in runs]
    layout = runs[0]["layout"]
    partition = full_bytes / layout["tp"] / (layout["dp"] if all(r["partitioned"] for r in runs[0]["ranks"]) else 1)
    return {
        "layout": layout,
        "mode": runs[0]["mode"],
        "mmap_threshold": mmap_threshold,
        "repeats": len(runs),
        "per_rank": per_rank,
        "worst_rank_peak_growth": _stats(worst),
        "full_model_bytes": full_bytes,
        "expected_held_bytes": partition,
        "largest_layer_bytes": layer_bytes,
        "peak_over_full": statistics.mean(worst) / full_bytes,
        "partitioned": all(r["partitioned"] for run in runs for r in run["ranks"]),
        "peak_reset": all(r["peak_reset"] for run in runs for r in run["ranks"]),
    }


def _gb(stats: dict[str, float], scale: float = GB) -> str:
    spread = f" ± {stats['std'] / scale:.2f}" if stats["std"] else ""
    return f"{stats['mean'] / scale:.2f}{spread} [{stats['min'] / scale:.2f}, {stats['max'] / scale:.2f}]"


def malloc_label(threshold: int) -> str:
    return "glibc default" if not threshold else f"MALLOC_MMAP_THRESHOLD_={threshold}"


def render_summary(summaries: dict[str, dict[str, Any]], notes: dict[str, str]) -> str:
    lines = [
        "| build | ranks (TP x DP) | malloc | peak RSS growth, worst rank (GB) | / full model "
        "| parameters held after (GB, per rank) | expected held + largest layer (GB) | build (s, rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries.values():
        layout = summary["layout"]
        held = statistics.mean(r["held_after"]["mean"] for r in summary["per_rank"]) / GB
        bound = (summary["expected_held_bytes"] + summary["largest_layer_bytes"]) / GB
        lines.append(
            f"| {LABELS[summary['mode']]} | {layout['ranks']} ({layout['tp']} x {layout['dp']}) "
            f"| {malloc_label(summary['mmap_threshold'])} | {_gb(summary['worst_rank_peak_growth'])} "
            f"| **{summary['peak_over_full']:.2f}** | {held:.2f} | {bound:.2f} "
            f"| {summary['per_rank'][0]['build_seconds']['mean']:.1f} |"
        )
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(f"* {key}: {note}" for key, note in notes.items())
    return text


def render_ranks(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| build | TP x DP | malloc | rank | peak RSS growth (GB) | RSS growth after (GB) | after malloc_trim (GB) "
        "| parameters held after (GB) | most parameter bytes held at once (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries.values():
        layout = summary["layout"]
        for rank in summary["per_rank"]:
            lines.append(
                f"| {LABELS[summary['mode']]} | {layout['tp']} x {layout['dp']} | {malloc_label(summary['mmap_threshold'])} "
                f"| {rank['rank']} | {_gb(rank['peak_growth'])} | {_gb(rank['growth_after'])} "
                f"| {_gb(rank['growth_after_trim'])} | {_gb(rank['held_after'])} | {_gb(rank['peak_held'])} |"
            )
    return "\n".join(lines)


def machine_line() -> str:
    import deepspeed

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, torch {torch.__version__}, "
        f"DeepSpeed {deepspeed.__version__}, Python {platform.python_version()}"
    )


def render_report(payload: dict[str, Any]) -> str:
    sizes, summaries = payload["sizes"], payload["summaries"]
    full = sizes["params"] * 4
    return (
        f"# Host memory of building the model\n\n`{payload['command']}`\n\n{time.strftime('%Y-%m-%d')}, "
        f"{payload['machine']}.\n\n"
        f"megamm's model at {sizes['params'] / 1e6:.1f}M parameters (`{' '.join(payload['shape'])}`): "
        f"**{full / GB:.2f} GB in fp32**; its largest layer {sizes['largest_layer_bytes'] / MB:.0f} MB. Each rank "
        "builds it through `megamm.train._build_model`; peak RSS growth is the kernel's high-water mark during "
        "the build (reset just before) minus the resident memory just before. Over "
        f"{payload['repeats']} launch(es) each: mean ± std [min, max]; GB = 10^9 bytes.\n\n"
        f"{render_summary(summaries, payload['notes'])}\n\n## Per rank\n\n{render_ranks(summaries)}\n\n"
        "'Most parameter bytes held at once' samples whole parameter tensors and ZeRO-3 partitions whenever a "
        "module registers a parameter; the master weight a tensor-parallel layer draws before slicing it is a "
        "temporary, seen by RSS only. 'after malloc_trim' is the RSS growth once glibc has handed its free memory "
        "back (`malloc_trim(0)` after the build): what remains is live. 'malloc': glibc's default dynamic mmap "
        "threshold, or `MALLOC_MMAP_THRESHOLD_` fixed for the ranks.\n"
    )


def parent_main(args: argparse.Namespace) -> int:
    shape = shape_overrides(args.hidden, args.layers)
    base = [*args.overrides, *shape, "parallel.zero_stage=3"]
    sizes = model_sizes(load_config(args.config, base))
    full = sizes["params"] * 4
    print(f"model: {sizes['params'] / 1e6:.1f}M parameters, {full / GB:.2f} GB in fp32 ({' '.join(shape)})", flush=True)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    raw: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="measure_build_memory-") as scratch:
        for threshold in args.malloc_mmap_threshold:
            for tp in args.tensor_parallel:
                for mode in args.modes:
                    ranks = args.ranks
                    if mode == "plain":
                        ranks, why = plain_ranks(args.plain_ranks, args.ranks, tp, full)
                        if why:
                            notes[f"{LABELS[mode]}, TP={tp}, {malloc_label(threshold)}"] = f"ran on {ranks} ranks: {why}"
                    key = f"{mode}/tp{tp}/mmap{threshold}"
                    runs = []
                    for repeat in range(args.repeats):
                        name = f"{mode}-tp{tp}-mmap{threshold}-repeat{repeat}"
                        result = run_job(args, mode, ranks, threshold, [*base, f"parallel.tensor_parallel={tp}"],
                                         Path(scratch) / f"{name}.json", out / "logs" / f"{name}.log")  # fmt: skip
                        if result is None:
                            return 1
                        result["mode"] = mode
                        runs.append(result)
                        worst = max(r["peak_growth"] for r in result["ranks"])
                        print(f"[measure] {key} repeat {repeat}: {ranks} ranks, worst peak RSS growth {worst / GB:.2f} "
                              f"GB ({worst / full:.2f} of the full model), build {result['ranks'][0]['build_seconds']:.1f} s",
                              flush=True)  # fmt: skip
                    raw[key] = runs
                    summaries[key] = summarise(runs, full, sizes["largest_layer_bytes"], threshold)
    command = "python tools/measure_build_memory.py " + " ".join(sys.argv[1:])
    payload = {
        "command": command,
        "machine": machine_line(),
        "shape": shape,
        "sizes": sizes,
        "repeats": args.repeats,
        "notes": notes,
        "summaries": summaries,
        "runs": raw,
    }
    report = render_report(payload)
    print("\n" + report)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="width of both towers (heads of 64)")
    parser.add_argument("--layers", type=int, default=10, help="blocks in each tower")
    parser.add_argument("--ranks", type=int, default=4, help="ranks of the ZeRO-3 build")
    parser.add_argument("--tensor-parallel", type=int, nargs="+", default=[1], help="tensor-parallel sizes to measure")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--plain-ranks", default="auto",
                        help="ranks of the plain build: a number, or auto (--ranks if it fits in memory, else fewer)")
    parser.add_argument("--malloc-mmap-threshold", type=int, nargs="+", default=[0],
                        help="glibc MALLOC_MMAP_THRESHOLD_ values (bytes) to build under; 0: glibc's dynamic default")
    parser.add_argument("--repeats", type=int, default=3, help="launches per measurement")
    parser.add_argument("--config", default="clip_tiny", help="recipe name or YAML path")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero3.json"))
    parser.add_argument("--out", default="runs/build_memory", help="results.md, results.json, logs/")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a job is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (not the sizes --hidden/--layers set)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    for tp in args.tensor_parallel:
        if args.ranks % tp:
            parser.error(f"--tensor-parallel {tp} does not divide --ranks {args.ranks}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker_main(args)
        # Interpreter teardown after DeepSpeed's ZeRO-3 structures can abort in a C++ destructor
        # ("terminate called without an active exception"); the measurement is written: leave.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
