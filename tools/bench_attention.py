#!/usr/bin/env python
"""Attention kernels against full attention: step time and peak memory against sequence length.

Kernels (``megamm.model.attention``), on q, k, v of shape (B, h, T, d), without the projections:

- ``full``: ``F.scaled_dot_product_attention`` as the model calls it (whatever backend torch picks:
  on CPU a flash-style kernel with O(T) memory; on CUDA flash or memory-efficient);
- ``full_math``: the same call forced onto SDPA's math backend (``sdpa_kernel(SDPBackend.MATH)``),
  which materialises the T x T scores: what full attention costs without a fused kernel;
- ``local``: sliding window of ``--window`` positions each side plus ``--global-tokens`` global tokens;
- ``block_sparse``: blocks of ``--block-size``, ``--neighbors`` neighbour blocks each side,
  ``--global-blocks`` global blocks;
- ``linear``: linear attention with the ``--feature-map`` feature map (elu or random).

A step is forward + backward of a fixed output gradient (``--forward-only``: forward under
``torch.no_grad``), ``--causal`` optional. Each (kernel, T) runs in a fresh subprocess:

- memory: on CPU, the peak resident set size of the step above the resident size just before it
  (the kernel's own working memory: inputs excluded), read from /proc/self/status after resetting
  the high-water mark (``/proc/self/clear_refs``); on CUDA, ``torch.cuda.max_memory_allocated``
  above ``memory_allocated`` before the step. Measured on the first step after a warm-up at a
  small length (libraries initialised), before any timing.
- time: ``--repeats`` repeats (at least 5), each the median of at least ``--iters`` steps and
  ``--min-seconds`` of stepping (CUDA: synchronised); reported as the median over repeats and
  their min and max.

Configurations whose estimated memory exceeds ``--max-gb`` are not run and are listed as skipped
(full_math at 16384 needs ~1 GB per head for each T x T matrix in fp32). Ratios are against
``full`` at the same T.

Writes ``results.json``, ``results.md`` and ``attention.png`` (log-log time and memory against T)
under ``--out`` (``--report-only`` rewrites the last two from the first).

    python tools/bench_attention.py --out docs/benchmarks/attention
    python tools/bench_attention.py --device cuda --lengths 1024 4096 16384 65536 --out runs/bench_attention
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KERNELS = ("full", "full_math", "local", "block_sparse", "linear")
LABELS = {
    "full": "full (SDPA, default backend)",
    "full_math": "full (SDPA math backend: T x T)",
    "local": "local (sliding window + global)",
    "block_sparse": "block-sparse",
    "linear": "linear",
}
MB = 2**20


# ----------------------------------------------------------------------------------------------
# Worker: one (kernel, T) in its own process


def build_kernel(name: str, options: dict[str, Any], head_dim: int):
    """The kernel under test as a callable (q, k, v, causal) -> context."""
    from megamm.model.attention import attention_kernel

    if name in ("full", "full_math"):
        kernel = attention_kernel("full")
    elif name == "local":
        kernel = attention_kernel("local", window=options["window"], global_tokens=options["global_tokens"])
    elif name == "block_sparse":
        kernel = attention_kernel(
            "block_sparse",
            block_size=options["block_size"],
            num_neighbors=options["neighbors"],
            num_global_blocks=options["global_blocks"],
        )
    elif name == "linear":
        kernel = attention_kernel("linear", head_dim=head_dim, feature_map=options["feature_map"])
    else:
        raise ValueError(f"unknown kernel {name!r}: choose from {', '.join(KERNELS)}")
    if name != "full_math":
        return kernel

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_backend(q, k, v, causal):
        with sdpa_kernel(SDPBackend.MATH):
            return kernel(q, k, v, causal=causal)

    return math_backend


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    batch, heads, length, dim = spec["batch"], spec["heads"], spec["length"], spec["head_dim"]
    causal, backward = spec["causal"], not spec["forward_only"]
    kernel = build_kernel(spec["kernel"], spec["options"], dim)
    if hasattr(kernel, "to"):
        kernel = kernel.to(device)
    run = kernel if spec["kernel"] == "full_math" else (lambda q, k, v, c: kernel(q, k, v, causal=c))

    def inputs(t: int):
        generator = torch.Generator(device=device).manual_seed(0)
        tensors = [torch.randn(batch, heads, t, dim, device=device, dtype=dtype, generator=generator) for _ in range(3)]
        grad = torch.randn(batch, heads, t, dim, device=device, dtype=dtype, generator=generator)
        return [x.requires_grad_(backward) for x in tensors], grad

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(q, k, v, grad) -> None:
        if backward:
            for x in (q, k, v):
                x.grad = None
            run(q, k, v, causal).backward(grad)
        else:
            with torch.no_grad():
                run(q, k, v, causal)

    warm, warm_grad = inputs(min(length, 256))
    step(*warm, warm_grad)
    del warm, warm_grad
    (q, k, v), grad = inputs(length)
    sync()

    # Memory: the first step at this length, before any timing.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(q, k, v, grad)
        sync()
        peak_mb = (torch.cuda.max_memory_allocated(device) - before) / MB
        memory_method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
    else:
        exact = _reset_peak_rss()
        before = _proc_status_mb("VmRSS") if exact else _proc_status_mb("VmHWM")
        step(q, k, v, grad)
        peak_mb = max(_proc_status_mb("VmHWM") - before, 0.0)
        memory_method = "peak RSS (VmHWM, reset) - RSS before the step" if exact else "VmHWM growth (no reset)"

    # Time: one more warm-up step sizes the repeats.
    start = time.perf_counter()
    step(q, k, v, grad)
    sync()
    first = time.perf_counter() - start
    iters = max(spec["iters"], math.ceil(spec["min_seconds"] / max(first, 1e-6)))
    repeats = []
    for _ in range(spec["repeats"]):
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step(q, k, v, grad)
            sync()
            times.append(time.perf_counter() - start)
        repeats.append(statistics.median(times) * 1e3)
    return {
        "peak_mb": peak_mb,
        "memory_method": memory_method,
        "step_ms": repeats,
        "iters_per_repeat": iters,
        "median_ms": statistics.median(repeats),
        "min_ms": min(repeats),
        "max_ms": max(repeats),
    }


# ----------------------------------------------------------------------------------------------
# Parent: plan, run, report


def estimate_mb(kernel: str, args: argparse.Namespace, length: int) -> float:
    """A generous estimate of one step's working memory (MB), for ``--max-gb``; inputs included."""
    size = 2 if args.dtype in ("float16", "bfloat16") else (8 if args.dtype == "float64" else 4)
    rows = args.batch * args.heads * length  # query rows over all heads
    tensors = 8 * rows * args.head_dim * size  # q, k, v, output, their gradients, temporaries
    if kernel == "full_math":
        per_row = 3 * length  # scores, probabilities, their gradient
    elif kernel == "local":
        per_row = 6 * (max(args.window // 2, 16) + 2 * args.window + args.global_tokens) + args.global_tokens
    elif kernel == "block_sparse":
        band = args.block_size * (2 * args.neighbors + 1 + args.global_blocks)
        per_row = 6 * band + args.global_blocks * args.block_size
    elif kernel == "linear":
        per_row = 4 * (64 + 2 * args.head_dim)  # causal chunks of 64; features
    else:  # full: fused, O(T) working memory
        per_row = 4 * args.head_dim
    return (tensors + rows * per_row * size) / MB


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": None,
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "megamm/model/attention", "tools/bench_attention.py"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        info["attention_code_modified"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def run_config(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "reason": f"exit {result.returncode}: {' | '.join(tail)}"}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT "):])}


def fmt_ms(entry: dict[str, Any]) -> str:
    def one(x: float) -> str:
        return f"{x:.3g}" if x < 100 else f"{x:.0f}"

    return f"{one(entry['median_ms'])} [{one(entry['min_ms'])}, {one(entry['max_ms'])}]"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else (f"{value:.2f}x" if value < 10 else f"{value:.0f}x")


def _table(title: str, kernels: list[str], lengths: list[int], cell) -> list[str]:
    lines = [f"## {title}", "", "| T | " + " | ".join(kernels) + " |", "| --- |" + " --- |" * len(kernels)]
    return lines + [f"| {t} | " + " | ".join(cell(k, t) for k in kernels) + " |" for t in lengths] + [""]


def report(results: dict[str, Any], out: Path) -> None:
    info, config, runs = results["machine"], results["config"], results["runs"]
    kernels, lengths = config["kernels"], config["lengths"]
    by = {(r["kernel"], r["length"]): r for r in runs}
    step = "forward" if config["forward_only"] else "forward + backward"
    cuda = f", {info['cuda_device']}" if "cuda_device" in info else ""
    modified = " (attention code modified in the working tree)" if info.get("attention_code_modified") else ""
    if config["device"] == "cpu":
        memory = "peak RSS of the step above the RSS before it (a fresh process per configuration)"
    else:
        memory = "torch.cuda.max_memory_allocated above the allocation before the step"

    def time_cell(kernel: str, length: int) -> str:
        r = by[(kernel, length)]
        if r["status"] != "ok":
            return r["status"]
        ratio = r.get("time_ratio_vs_full")
        return fmt_ms(r) + ("" if kernel == "full" or ratio is None else f" ({fmt_ratio(ratio)})")

    def memory_cell(kernel: str, length: int) -> str:
        r = by[(kernel, length)]
        if r["status"] == "skipped":
            return f"skipped (est. {r['estimated_mb']:.0f})"
        if r["status"] != "ok":
            return r["status"]
        ratio = r.get("memory_ratio_vs_full")
        return f"{r['peak_mb']:.1f}" + ("" if kernel == "full" or ratio is None else f" ({fmt_ratio(ratio)})")

    lines = [
        "# Attention kernels: time and peak memory against sequence length",
        "",
        f"{step}{' (causal)' if config['causal'] else ''}, B={config['batch']}, h={config['heads']}, "
        f"d={config['head_dim']}, {config['dtype']}, device {config['device']}, {config['threads']} threads. "
        f"local: window {config['window']} each side + {config['global_tokens']} global tokens; block-sparse: "
        f"blocks of {config['block_size']}, {config['neighbors']} neighbour(s) each side, "
        f"{config['global_blocks']} global block(s); linear: {config['feature_map']} features.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}){cuda}; torch {info['torch']}; {info['date']}; "
        f"commit {info['commit']}{modified}.",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Time: ms per step, median of {config['repeats']} repeats [min, max]. Memory: {memory}, MB (2^20 "
        f"bytes). In parentheses: the ratio to `full` at the same T (below 1: faster, or smaller). Skipped: "
        f"estimated memory above --max-gb {config['max_gb']}.",
        "",
        *_table("Time (ms per step)", kernels, lengths, time_cell),
        *_table("Peak memory (MB)", kernels, lengths, memory_cell),
    ]
    missing = [r for r in runs if r["status"] != "ok"]
    if missing:
        lines += ["## Not measured", ""]
        lines += [f"- {r['kernel']} at T={r['length']}: {r['status']}: {r['reason']}" for r in missing] + [""]
    lines += ["## Fastest and smallest at each T", "", "| T | fastest | least memory |", "| --- | --- | --- |"]
    for length in lengths:
        ok = [by[(k, length)] for k in kernels if by[(k, length)]["status"] == "ok"]
        if ok:
            fastest = min(ok, key=lambda r: r["median_ms"])["kernel"]
            smallest = min(ok, key=lambda r: r["peak_mb"])["kernel"]
            lines.append(f"| {length} | {fastest} | {smallest} |")
    lines += ["", "![time and memory against T](attention.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = dict(zip(KERNELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))  # one colour per kernel, every run
    for kernel in config["kernels"]:
        points = [r for r in results["runs"] if r["kernel"] == kernel and r["status"] == "ok"]
        if not points:
            continue
        lengths = [r["length"] for r in points]
        medians = [r["median_ms"] for r in points]
        low = [m - r["min_ms"] for m, r in zip(medians, points)]
        high = [r["max_ms"] - m for m, r in zip(medians, points)]
        style = dict(marker="o", label=LABELS.get(kernel, kernel), color=colors.get(kernel))
        axes[0].errorbar(lengths, medians, yerr=[low, high], capsize=3, **style)
        axes[1].plot(lengths, [max(r["peak_mb"], 1e-2) for r in points], **style)
        skipped = [r for r in results["runs"] if r["kernel"] == kernel and r["status"] == "skipped"]
        if skipped:
            axes[1].plot([r["length"] for r in skipped], [r["estimated_mb"] for r in skipped], marker="x",
                         linestyle="none", color=colors.get(kernel))  # fmt: skip
    step = "forward" if config["forward_only"] else "forward + backward"
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms per step (median, min-max)",
                title=f"time, {step}")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="peak working memory (MB)",
                title="memory (x: skipped, estimate)")  # fmt: skip
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"B={config['batch']}, h={config['heads']}, d={config['head_dim']}, {config['dtype']}, {config['device']}"
        f"{', causal' if config['causal'] else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/attention")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="time the forward pass alone (no_grad)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--global-tokens", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--neighbors", type=int, default=1)
    parser.add_argument("--global-blocks", type=int, default=1)
    parser.add_argument("--feature-map", default="elu", choices=["elu", "random"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1, help="steps per repeat, at least")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="seconds per repeat, at least")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip configurations estimated above this")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        report(results, args.out)
        plot(results, args.out)
        print(f"rewrote {args.out}/results.md and attention.png from results.json")
        return 0
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (median and spread)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here")
    kernels = [k for k in KERNELS if k in args.kernels]
    if "full" not in kernels:
        kernels.insert(0, "full")  # the reference of every ratio
    args.out.mkdir(parents=True, exist_ok=True)
    options = {
        "window": args.window, "global_tokens": args.global_tokens, "block_size": args.block_size,
        "neighbors": args.neighbors, "global_blocks": args.global_blocks, "feature_map": args.feature_map,
    }  # fmt: skip
    config = {
        "kernels": kernels, "lengths": sorted(args.lengths), "batch": args.batch, "heads": args.heads,
        "head_dim": args.head_dim, "dtype": args.dtype, "device": args.device, "causal": args.causal,
        "forward_only": args.forward_only, "repeats": args.repeats, "iters": args.iters,
        "min_seconds": args.min_seconds, "threads": args.threads, "max_gb": args.max_gb, **options,
    }  # fmt: skip
    results: dict[str, Any] = {"machine": machine(), "config": config, "runs": []}
    started = time.perf_counter()
    for length in config["lengths"]:
        for kernel in kernels:
            estimate = estimate_mb(kernel, args, length)
            entry: dict[str, Any] = {"kernel": kernel, "length": length, "estimated_mb": estimate}
            if estimate > args.max_gb * 1024:
                entry.update(status="skipped", reason=f"estimated {estimate / 1024:.1f} GB > --max-gb {args.max_gb}")
            else:
                spec = {**{k: config[k] for k in ("batch", "heads", "head_dim", "dtype", "device", "causal",
                                                    "forward_only", "repeats", "iters", "min_seconds", "threads")},
                        "kernel": kernel, "length": length, "options": options}  # fmt: skip
                began = time.perf_counter()
                entry.update(run_config(spec, args.timeout))
                entry["wall_s"] = time.perf_counter() - began
            results["runs"].append(entry)
            if entry["status"] == "ok":
                shown = f"{fmt_ms(entry)} ms, {entry['peak_mb']:.1f} MB"
            else:
                shown = f"{entry['status']}: {entry['reason']}"
            print(f"T={length:>6} {kernel:>12}: {shown}", flush=True)
    by = {(r["kernel"], r["length"]): r for r in results["runs"]}
    for r in results["runs"]:
        full = by[("full", r["length"])]
        if r["status"] == "ok" and full["status"] == "ok":
            r["time_ratio_vs_full"] = r["median_ms"] / full["median_ms"]
            r["memory_ratio_vs_full"] = r["peak_mb"] / full["peak_mb"] if full["peak_mb"] > 0 else None
    results["total_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results, args.out)
    plot(results, args.out)
    print(f"wrote {args.out}/results.json, results.md, attention.png in {results['total_seconds']:.0f} s")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
