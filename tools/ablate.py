#!/usr/bin/env python
"""Run an ablation: config variants x seeds of launchers/pretrain.py, then tabulate and plot.

    python tools/ablate.py --config clip_tiny --out docs/ablations/lr --grid optim.lr=1e-3,3e-3 \\
        --variant "fixed-init: model.init=fixed" --seeds 0 1 2 --parallel 2 \\
        --target text_to_image_R@1=0.3 -- train_steps=300

Variants are the cartesian product of the --grid values (split on commas outside [brackets]),
crossed with the --variant entries if both are given; with neither there is one "base" variant.
Overrides after `--` apply to every run (a variant's own value of the same key wins), and
seed S adds seed=S data.seed=S. Each run gets its own directory OUT/runs/<variant>/seed<S>/
(TensorBoard events, final checkpoint, train.log; a result.json once it succeeded); the tool
writes OUT/results.md, OUT/results.json, OUT/curves.png.
Runs execute in the repository root: relative paths (--out, --config, overrides) are relative to it.
Exit status: 0 if every run succeeded, 1 if any failed, 2 for bad arguments or configuration,
130 when interrupted (running runs are stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

from megamm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launchers" / "pretrain.py"
# What megamm.evaluation.retrieval_metrics reports (logged as eval/<name>).
RETRIEVAL_METRICS = tuple(f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
# Per-run values shown in the table: (key in a run's metrics, column header, decimals).
COLUMNS = (
    ("train/loss", "Final train loss", 4),
    ("eval/text_to_image_R@1", "T→I R@1", 3),
    ("eval/text_to_image_R@5", "T→I R@5", 3),
    ("eval/image_to_text_R@1", "I→T R@1", 3),
    ("samples_per_second", "Samples/s", 1),
)
TARGET_COLUMNS = (("target_step", "Steps to target", 1), ("target_seconds", "Seconds to target", 1))
CAPTION = (
    "Mean ± sample standard deviation (n−1) over the seeds that finished (a single seed: its value). "
    "Final values are those logged at the last step. Samples/s: per run, the mean of the logged "
    "throughput after the first log interval. Wall time counts from the first logged training step "
    "(step `logging.log_interval`), so start-up and the first interval are excluded; time to target "
    "is the step and wall time of the first evaluation reaching it, over the seeds that reached it "
    "(k/n when only k of the n finished seeds did)."
)

Point = tuple[int, float, float]  # (step, wall time in s since the first train/loss event, value)
Scalars = dict[str, list[Point]]


@dataclass(frozen=True)
class Variant:
    """One configuration under test: the overrides that distinguish it from the others."""

    label: str
    slug: str
    """Directory name under OUT/runs/."""
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One training process: a variant with a seed, in its own directory."""

    variant: Variant
    seed: int
    dir: Path
    overrides: tuple[str, ...]
    """Every override passed to launchers/pretrain.py."""

    @property
    def log(self) -> Path:
        return self.dir / "train.log"

    @property
    def result_file(self) -> Path:
        return self.dir / "result.json"


@dataclass
class Outcome:
    """A finished (or reused) run: its exit status, duration and TensorBoard scalars."""

    run: Run
    returncode: int
    seconds: float
    """Wall time of the whole process, start-up included."""
    scalars: Scalars

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line (see the module docstring), with variants expanded and the target parsed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="clip_tiny", help="recipe name or YAML path (default: clip_tiny)")
    parser.add_argument("--out", required=True, type=Path, help="output directory, e.g. docs/ablations/NAME")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid axis (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar='"LABEL: K=V ..."',
                        help="explicit variant (repeatable); the label defaults to its overrides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per variant (default: 0)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default: 1)")
    parser.add_argument("--threads-per-run", type=int, help="CPU threads per run (default: cpu_count // parallel)")
    parser.add_argument("--target", metavar="METRIC=VALUE", help="e.g. text_to_image_R@1=0.9: report time to reach it")
    parser.add_argument("--launcher-cmd", help='command prefix instead of python, e.g. "deepspeed --num_gpus 2 '
                        '--master_addr 127.0.0.1 --master_port {port}" ({port}: a free loopback port)')
    parser.add_argument("--skip-existing", action="store_true", help="reuse runs that already finished successfully")
    parser.add_argument("overrides", nargs="*", help="common overrides key.sub=value (after --)")
    args = parser.parse_args(argv)
    if args.parallel < 1 or (args.threads_per_run is not None and args.threads_per_run < 1):
        parser.error("--parallel and --threads-per-run must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    try:
        args.target_metric, args.target_value = parse_target(args.target)
        args.variants = expand_variants(args.grid, args.variant)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_target(spec: Optional[str]) -> tuple[str, Optional[float]]:
    """``"text_to_image_R@1=0.9"`` -> ``("eval/text_to_image_R@1", 0.9)``; None -> the default metric, no target."""
    if spec is None:
        return "eval/text_to_image_R@1", None
    name, _, value = spec.partition("=")
    name = name.strip().removeprefix("eval/")
    if name not in RETRIEVAL_METRICS:
        raise ValueError(f"--target {spec!r}: the metric must be one of {', '.join(RETRIEVAL_METRICS)}")
    try:
        return f"eval/{name}", float(value)
    except ValueError:
        raise ValueError(f"--target {spec!r} is not of the form METRIC=NUMBER") from None


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("=", "-")).strip("_") or "base"


def expand_variants(grid: Sequence[str], variants: Sequence[str]) -> list[Variant]:
    """Cross the ``--grid`` axes with the ``--variant`` entries into labelled, uniquely slugged variants."""
    axes = []
    for axis in grid:
        key, sep, values = axis.partition("=")
        if not sep or not key.strip() or not values:
            raise ValueError(f"--grid {axis!r} is not of the form key=v1,v2")
        axes.append([f"{key.strip()}={value}" for value in re.split(r",(?![^\[]*\])", values)])
    explicit: list[tuple[str, list[str]]] = []
    for spec in variants:
        head, sep, tail = spec.partition(":")
        label, overrides = (head.strip(), shlex.split(tail)) if sep and "=" not in head else ("", shlex.split(spec))
        if not label and not overrides:
            raise ValueError(f"--variant {spec!r} has neither a label nor overrides")
        explicit.append((label, overrides))
    result: list[Variant] = []
    for (label, overrides), point in itertools.product(explicit or [("", [])], itertools.product(*axes)):
        full = " ".join(filter(None, [label or " ".join(overrides), *point])) or "base"
        if any(v.label == full for v in result):
            raise ValueError(f"variant {full!r} is given twice")
        slug, n = _slug(full), 2
        while any(v.slug == slug for v in result):
            slug, n = f"{_slug(full)}-{n}", n + 1
        result.append(Variant(full, slug, (*overrides, *point)))
    return result


def plan_runs(variants: Sequence[Variant], seeds: Sequence[int], common: Sequence[str], out: Path) -> list[Run]:
    """One run per seed and variant, seed-major so that early results cover every variant.

    A variant's override replaces a common override of the same key.
    """
    runs = []
    for seed, variant in itertools.product(seeds, variants):
        run_dir = out / "runs" / variant.slug / f"seed{seed}"
        own_keys = {override.split("=", 1)[0].strip() for override in variant.overrides}
        kept = [override for override in common if override.split("=", 1)[0].strip() not in own_keys]
        user = [*kept, *variant.overrides]
        only_final = [] if any(o.startswith("checkpoint.save_interval=") for o in user) else [
            "checkpoint.save_interval=1000000000"  # only the final checkpoint, unless asked otherwise
        ]
        overrides = (
            *only_final,
            *user,
            f"seed={seed}",
            f"data.seed={seed}",
            f"checkpoint.dir={run_dir / 'checkpoints'}",
            f"logging.tensorboard_dir={run_dir / 'tensorboard'}",
        )
        runs.append(Run(variant, seed, run_dir, overrides))
    return runs


def _free_port(taken: set[int]) -> int:
    """A loopback port that is free now and not yet handed to another run."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def start_run(run: Run, recipe: str, launcher_cmd: Optional[str], threads: int, port: int) -> subprocess.Popen:
    """Start one training run (fresh directory) in its own session, stdout and stderr to its train.log."""
    shutil.rmtree(run.dir, ignore_errors=True)
    run.dir.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONUNBUFFERED="1")
    if launcher_cmd:
        prefix = shlex.split(launcher_cmd.replace("{port}", str(port)))
    else:
        prefix = [sys.executable]
    command = [*prefix, str(PRETRAIN), "--config", recipe, "--resume", "none", *run.overrides]
    with open(run.log, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a run's process group (its session, led by ``process.pid``); SIGKILL what is left after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def read_scalars(tensorboard_dir: Path) -> Scalars:
    """Every scalar event of a run, wall times relative to its first ``train/loss`` event."""
    if not tensorboard_dir.is_dir():
        return {}
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
    if not events:
        return {}
    origin = min(e.wall_time for e in events.get("train/loss") or itertools.chain(*events.values()))
    return {tag: [(e.step, e.wall_time - origin, e.value) for e in items] for tag, items in events.items()}


def run_all(runs: Sequence[Run], parallel: int, launch: Callable[[Run, int], subprocess.Popen],
            on_done: Callable[[Outcome], None]) -> list[Outcome]:
    """Launch ``runs`` (``launch(run, port)``) ``parallel`` at a time and poll them; a run that exits 0
    gets its result.json. On any exception (KeyboardInterrupt included) every running run is stopped."""
    pending = list(runs)
    running: list[tuple[Run, float, subprocess.Popen]] = []  # (run, start time, process)
    done: list[Outcome] = []
    taken_ports: set[int] = set()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                running.append((run, time.time(), launch(run, _free_port(taken_ports))))
            for item in [item for item in running if item[2].poll() is not None]:
                running.remove(item)
                run, started, process = item
                seconds = time.time() - started
                if process.returncode == 0:
                    record = {"variant": run.variant.label, "seed": run.seed, "started": started, "seconds": seconds}
                    run.result_file.write_text(json.dumps(record, indent=2) + "\n")
                done.append(Outcome(run, process.returncode, seconds, read_scalars(run.dir / "tensorboard")))
                on_done(done[-1])
            time.sleep(0.2)
    finally:
        for _, _, process in running:
            stop(process)
    return done


def run_metrics(scalars: Scalars, target_metric: str, target_value: Optional[float]) -> dict[str, Optional[float]]:
    """Pure: a run's final values, mean throughput after the first interval, and step and time to target."""
    metrics = {tag: scalars[tag][-1][2] if scalars.get(tag) else None for tag, _, _ in COLUMNS[:-1]}
    throughput = [value for _, _, value in scalars.get("train/samples_per_second", [])]
    metrics["samples_per_second"] = statistics.fmean(throughput[1:] or throughput) if throughput else None
    reached = [(step, wall) for step, wall, value in scalars.get(target_metric, [])
               if target_value is not None and value >= target_value]
    metrics["target_step"], metrics["target_seconds"] = reached[0] if reached else (None, None)
    return metrics


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"values": list(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Pure: per-run records (``variant``, ``status``, ``metrics``) -> one row of statistics per variant."""
    rows = []
    for label in variants:
        ok = [r for r in runs if r["variant"] == label and r["status"] == "ok"]
        row: dict[str, Any] = {"variant": label, "ok": len(ok),
                               "failed": sum(r["variant"] == label and r["status"] != "ok" for r in runs)}
        for key, _, _ in COLUMNS + TARGET_COLUMNS:
            row[key] = _stats([r["metrics"][key] for r in ok if r["metrics"][key] is not None])
        rows.append(row)
    return rows


def _cell(stats: dict[str, Any], decimals: int) -> str:
    if stats["mean"] is None:
        return "—"
    if stats["std"] is None:
        return f"{stats['mean']:.{decimals}f}"
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}"


def _target_cell(stats: dict[str, Any], decimals: int, finished: int) -> str:
    reached = len(stats["values"])
    if not reached:
        return f"not reached (0/{finished})" if finished else "—"
    return _cell(stats, decimals) + (f" ({reached}/{finished})" if reached < finished else "")


def write_table(path: Path, report: dict[str, Any]) -> None:
    """results.md: the table, how to read it, the failed runs with their logs, how to reproduce it."""
    target = report["target"]
    columns = COLUMNS + (TARGET_COLUMNS if target else ())
    lines = [f"# Ablation: {path.parent.name}", "",
             f"Recipe `{report['recipe']}`, {len(report['variants'])} variants x seeds "
             f"{', '.join(map(str, report['seeds']))}"
             + (f"; target `{target['metric']} >= {target['value']}`." if target else "."), "",
             "| Variant | Seeds (ok/failed) | " + " | ".join(header for _, header, _ in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for row in report["variants"]:
        cells = [f"`{row['variant']}`".replace("|", "\\|"), f"{row['ok']}/{row['failed']}"]
        cells += [_cell(row[key], decimals) for key, _, decimals in COLUMNS]
        cells += [_target_cell(row[key], decimals, row["ok"]) for key, _, decimals in TARGET_COLUMNS if target]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", CAPTION]
    failed = [r for r in report["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r['variant']}` seed {r['seed']}: failed with exit code {r['returncode']}, "
                  f"log [{r['log']}]({r['log']})" for r in failed]
    lines += ["", "## Reproduce", "", "From the repository root:", "", "```bash", report["command"], "```", "",
              f"Date: {report['date']}. Machine: {report['machine']}.", ""]
    path.write_text("\n".join(lines))


def _mean_curve(curves: Sequence[list[Point]], by_time: bool) -> tuple[list[float], list[float]]:
    """Mean over seeds at the steps every seed logged (x: the step, or the mean wall time there)."""
    by_step = [{step: (wall, value) for step, wall, value in curve} for curve in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_step)))
    xs = [statistics.fmean(c[s][0] for c in by_step) if by_time else s for s in steps]
    return xs, [statistics.fmean(c[s][1] for c in by_step) for s in steps]


def plot(path: Path, outcomes: Sequence[Outcome], variants: Sequence[Variant], metric: str,
         target: Optional[float], title: str) -> None:
    """curves.png: loss and ``metric`` against step and wall time; each seed faint, their mean solid."""
    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [(axes[0][0], "train/loss", False), (axes[0][1], "train/loss", True),
              (axes[1][0], metric, False), (axes[1][1], metric, True)]
    for index, variant in enumerate(variants):
        color = colormaps["tab10"](index % 10)
        seeds = [o.scalars for o in outcomes if o.run.variant == variant and o.ok]
        for ax, tag, by_time in panels:
            curves = [s[tag] for s in seeds if s.get(tag)]
            for curve in curves:
                ax.plot([p[1] if by_time else p[0] for p in curve], [p[2] for p in curve],
                        color=color, alpha=0.35, linewidth=0.7)
            if curves:
                ax.plot(*_mean_curve(curves, by_time), color=color, linewidth=2,
                        label=variant.label if ax is axes[0][0] else None)
    for ax, tag, by_time in panels:
        ax.set_xlabel("wall time since the first logged step (s)" if by_time else "step")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        if tag == metric and target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _shown(path: Path, base: Path = ROOT) -> str:
    """``path`` relative to ``base`` when inside it, else absolute."""
    return os.path.relpath(path, base) if path.is_relative_to(base) else str(path)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C (running runs are stopped on the way out)."""
    raise KeyboardInterrupt


def execute(runs: Sequence[Run], args: argparse.Namespace, threads: int, desc: str) -> list[Outcome]:
    """Reuse finished runs (with --skip-existing), run the others under a progress bar reporting each result."""
    reused = [run for run in runs if args.skip_existing and run.result_file.is_file()]
    with tqdm(total=len(runs), unit="run", desc=desc) as bar:
        def report(outcome: Outcome, how: str = "ok") -> None:
            run, final = outcome.run, outcome.scalars.get(args.target_metric)
            name = f"{run.variant.label} seed {run.seed}"
            if outcome.ok:
                value = f"{final[-1][2]:.3f}" if final else "n/a"
                tqdm.write(f"{name}: {how} ({outcome.seconds:.0f}s), final {args.target_metric} {value}")
            else:
                tqdm.write(f"{name}: FAILED (exit {outcome.returncode}), log: {_shown(run.log)}")
            bar.update()

        outcomes = []
        for run in reused:
            seconds = json.loads(run.result_file.read_text())["seconds"]
            outcomes.append(Outcome(run, 0, seconds, read_scalars(run.dir / "tensorboard")))
            report(outcomes[-1], how="reused")

        def launch(run: Run, port: int) -> subprocess.Popen:
            return start_run(run, args.config, args.launcher_cmd, threads, port)

        return outcomes + run_all([run for run in runs if run not in reused], args.parallel, launch, report)


def validate(runs: Sequence[Run], recipe: str) -> Optional[str]:
    """Load every run's full configuration before any run starts: the first error message, or None."""
    for run in runs:
        try:
            load_config(recipe, run.overrides)
        except ConfigError as error:
            return f"configuration error in variant {run.variant.label!r}: {error}"
    return None


def build_report(outcomes: Sequence[Outcome], runs: Sequence[Run], out: Path, args: argparse.Namespace,
                 argv: Sequence[str], threads: int) -> dict[str, Any]:
    """results.json: how the ablation ran, one record per run (in plan order) and one row per variant."""
    order = {run: index for index, run in enumerate(runs)}
    records = [{"variant": o.run.variant.label, "seed": o.run.seed, "status": "ok" if o.ok else "failed",
                "returncode": o.returncode, "dir": _shown(o.run.dir, out), "log": _shown(o.run.log, out),
                "process_seconds": o.seconds, "metrics": run_metrics(o.scalars, args.target_metric, args.target_value)}
               for o in sorted(outcomes, key=lambda o: order[o.run])]
    return {
        "command": shlex.join(["python", "tools/ablate.py", *(a.replace(f"{ROOT}/", "") for a in argv)]),
        "recipe": args.config,
        "seeds": args.seeds,
        "target": {"metric": args.target_metric, "value": args.target_value} if args.target else None,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {version('torch')}; "
                   f"{args.parallel} run(s) at a time, {threads} thread(s) each",
        "caption": CAPTION,
        "variants": summarise(records, [v.label for v in args.variants]),
        "runs": records,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Validate, run, then write results.json, results.md and curves.png; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.chdir(ROOT)
    out = args.out.resolve()
    runs = plan_runs(args.variants, args.seeds, args.overrides, out)
    error = validate(runs, args.config)
    if error:
        print(error, file=sys.stderr)
        return 2
    threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // args.parallel)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        outcomes = execute(runs, args, threads, f"ablation {out.name}")
    except KeyboardInterrupt:
        print("interrupted: stopped the running runs", file=sys.stderr)
        return 130
    report = build_report(outcomes, runs, out, args, argv, threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(out / "results.md", report)
    plot(out / "curves.png", outcomes, args.variants, args.target_metric, args.target_value,
         f"{args.config}: {out.name}")
    print(f"wrote {_shown(out / 'results.md')}, results.json and curves.png", file=sys.stderr)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
