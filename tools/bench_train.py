#!/usr/bin/env python
"""Training benchmark: megamm against a plain-PyTorch CLIP, side by side, in one run.

Every training run of the benchmark sees the very same data: the demo shards are decoded once
into memory and every run draws the same sequence of random global batches (seeded), so the
loss and recall curves of the runs are comparable step for step. Runs:

- ``plain``: ``tools/plain_clip.PlainCLIP`` (``torch.nn`` only) with torch AdamW and the same
  optimizer settings and schedule as the recipe;
- ``megamm 1 proc``: megamm's model in its DeepSpeed engine, TP=1, one process, fed the same
  in-memory batches. It trains in the same process as ``plain``, the two alternating step by
  step (which goes first alternates too), so that both see the same machine: on a shared or
  throttled machine, runs one after the other can differ by 30% in speed;
- ``megamm 1 proc, loader``: megamm alone with its WebDataset loader as the data source, to
  measure how long training waits for data;
- ``megamm TP=2 x DP=2 ZeRO-3``: 4 ranks through the ``deepspeed`` launcher on 127.0.0.1; each
  data-parallel rank takes its half of the same global batch.

Each kind of run is a fresh process. Step time is split into data wait, forward, backward and optimizer;
retrieval R@1 on the held-out split is measured every ``--eval-every`` steps, outside the timed
step, and the time to the target R@1 is the summed step time until the first evaluation that
reaches it. FLOPs per sample come from ``megamm.flops`` (the model's shapes); the matmul peak
of this machine is measured in the same run, and MFU is quoted against it.

    python tools/bench_train.py --repeats 3 --out docs/benchmarks/train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.config import TrainConfig, load_config  # noqa: E402
from megamm.flops import measure_matmul_peak, mfu, model_flops_per_sample  # noqa: E402
from tools.plain_clip import InMemoryData, PlainCLIP, load_split, random_batches  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")
RUNS = ("plain", "megamm", "megamm_loader", "megamm_tp2dp2")
WORKERS = {"pair": ("plain", "megamm"), "megamm_loader": ("megamm_loader",), "megamm_tp2dp2": ("megamm_tp2dp2",)}
"""Each worker process trains these runs (a pair alternating step by step)."""
LABELS = {
    "plain": "plain PyTorch, 1 proc",
    "megamm": "megamm 1 proc (TP=1)",
    "megamm_loader": "megamm 1 proc, WebDataset loader",
    "megamm_tp2dp2": "megamm TP=2 x DP=2 ZeRO-3, 4 ranks",
}
BASELINE = {"megamm": "plain", "megamm_loader": "plain", "megamm_tp2dp2": "plain"}


# ----------------------------------------------------------------------------------------------
# One timed training run (runs inside a worker process)


@dataclass
class RunResult:
    """What one run measured. Times in seconds; ``evals`` holds (step, train seconds, R@1)."""

    name: str
    steps: int
    global_batch: int
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    final_loss: float = float("nan")
    loader_samples_per_second: Optional[float] = None

    @property
    def train_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    def time_to(self, target: float) -> Optional[tuple[int, float]]:
        """(step, training seconds) of the first evaluation with R@1 >= target."""
        return next(((step, seconds) for step, seconds, r1 in self.evals if r1 >= target), None)


class Trainee:
    """The four timed phases of one step plus evaluation, for one implementation."""

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def recall_at_1(self) -> float:
        raise NotImplementedError


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_training(
    trainees: dict[str, tuple[Trainee, Iterator[tuple[torch.Tensor, ...]]]],
    steps: int,
    global_batch: int,
    eval_every: int,
) -> dict[str, RunResult]:
    """Train every trainee ``steps`` steps on its batches, alternating step by step (and the order
    within a step), timing each phase; evaluate every ``eval_every`` steps, untimed."""
    results = {name: RunResult(name, steps, global_batch) for name in trainees}
    clock = time.perf_counter
    for step in range(1, steps + 1):
        order = list(trainees) if step % 2 else list(reversed(trainees))
        for name in order:
            trainee, batches = trainees[name]
            marks = [clock()]
            batch = next(batches)
            marks.append(clock())
            loss = trainee.forward(batch)
            _sync()
            marks.append(clock())
            trainee.backward(loss)
            _sync()
            marks.append(clock())
            trainee.optimizer_step()
            _sync()
            marks.append(clock())
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                results[name].phase_seconds[phase] += end - start
            results[name].final_loss = loss.item()
        if step % eval_every == 0 or step == steps:
            for name, (trainee, _) in trainees.items():
                results[name].evals.append((step, results[name].train_seconds, trainee.recall_at_1()))
    return results


def _recall_at_1(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    from megamm.evaluation import retrieval_metrics

    return retrieval_metrics(image_emb, text_emb)["text_to_image_R@1"]


class PlainTrainee(Trainee):
    """PlainCLIP with torch AdamW, the recipe's schedule and clipping."""

    def __init__(self, config: TrainConfig, eval_data: InMemoryData) -> None:
        from megamm.engine.builder import warmup_cosine

        torch.manual_seed(config.seed)
        self.model = PlainCLIP.from_megamm_config(config.model)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, optim.warmup_steps, config.train_steps, optim.min_lr_ratio),
        )
        self.grad_clip = optim.grad_clip
        self.eval_data = eval_data

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model(*batch)["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()

    def recall_at_1(self) -> float:
        self.model.eval()
        with torch.no_grad():
            outs = [self.model(*batch) for batch in self.eval_data.sequential(64)]
        self.model.train()
        return _recall_at_1(torch.cat([o["image_emb"] for o in outs]), torch.cat([o["text_emb"] for o in outs]))


class MegammTrainee(Trainee):
    """megamm's model inside its DeepSpeed engine (any TP x DP layout of the current launch)."""

    def __init__(self, config: TrainConfig, ds_template: str, eval_data: InMemoryData) -> None:
        from megamm.engine import build_ds_config, build_engine, device, init_distributed, load_template
        from megamm.model import MultiModalTransformer
        from megamm.parallel import ParallelState

        init_distributed()
        self.parallel = ParallelState.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
        ds_config = build_ds_config(load_template(ds_template), config, self.parallel.dp_size)
        torch.manual_seed(config.seed)
        model = MultiModalTransformer(config.model, self.parallel)
        self.engine = build_engine(model, config.optim, config.train_steps, ds_config, self.parallel)
        self.device = device()
        self.eval_batches = [
            {"image": i, "text_ids": t, "text_mask": m, "keys": [""] * len(i)} for i, t, m in eval_data.sequential(64)
        ]

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.engine(*(x.to(self.device, non_blocking=True) for x in batch))["loss"]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        from megamm.engine import clamp_parameters

        self.engine.step()
        clamp_parameters(self.engine)

    def recall_at_1(self) -> float:
        from megamm.engine import make_runner
        from megamm.train import evaluate_retrieval

        share = self.eval_batches[self.parallel.dp_rank :: self.parallel.dp_size]
        runner = make_runner(self.engine, self.parallel)
        metrics, _ = evaluate_retrieval(runner, share, self.parallel, self.eval_batches[0])
        return metrics["text_to_image_R@1"]


def _memory_batches(
    data: InMemoryData, indices: torch.Tensor, dp_rank: int, dp_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """This data-parallel rank's share of each global batch of ``indices`` (steps, global)."""
    local = indices.shape[1] // dp_size
    for row in indices:
        yield data.batch(row[dp_rank * local : (dp_rank + 1) * local])


def _loader_batches(config: TrainConfig) -> tuple[Iterator[tuple[torch.Tensor, ...]], float]:
    """megamm's training loader (one DP rank) and its throughput alone, measured first."""
    from megamm.data import Tokenizer, build_train_loader

    tokenizer = Tokenizer(config.data.tokenizer)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        extras = config.model.data_extras  # what megamm's training reads
        for batch in build_train_loader(config.data, tokenizer, 0, 1, config.micro_batch_size, extras=extras):
            yield batch["image"], batch["text_ids"], batch["text_mask"]

    probe, count = batches(), 100
    next(probe)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(count):
        next(probe)
    rate = count * config.micro_batch_size / (time.perf_counter() - start)
    probe.close()  # stops its DataLoader worker
    return batches(), rate


def worker_main(args: argparse.Namespace) -> None:
    """One worker's runs, in this process (or in each rank of a launch); rank 0 writes the results."""
    config = load_config(args.config, args.overrides)
    data = load_split(config.data.train_shards, config.data.tokenizer, config.data.image_size, config.data.max_text_length)
    eval_data = load_split(config.data.eval_shards, config.data.tokenizer, config.data.image_size, config.data.max_text_length)
    indices = random_batches(len(data), args.global_batch, config.train_steps, args.data_seed)
    megamm = MegammTrainee(config, args.ds_config, eval_data)
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    dp_rank, dp_size = megamm.parallel.dp_rank, megamm.parallel.dp_size
    loader_rate = None
    if args.worker == "pair":
        trainees = {
            "plain": (PlainTrainee(config, eval_data), _memory_batches(data, indices, 0, 1)),
            "megamm": (megamm, _memory_batches(data, indices, 0, 1)),
        }
    elif args.worker == "megamm_loader":
        batches, loader_rate = _loader_batches(config)
        trainees = {"megamm_loader": (megamm, batches)}
    else:
        trainees = {args.worker: (megamm, _memory_batches(data, indices, dp_rank, dp_size))}
    results = timed_training(trainees, config.train_steps, args.global_batch, args.eval_every)
    for result in results.values():
        result.loader_samples_per_second = loader_rate
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps([asdict(r) for r in results.values()]))


# ----------------------------------------------------------------------------------------------
# The parent: launch the runs, collect, print and write the comparison


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_command(worker: str, args: argparse.Namespace, result: Path, seed: int) -> tuple[list[str], dict[str, str]]:
    overrides = [*args.overrides, f"seed={seed}", f"train_steps={args.steps}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    script = [str(ROOT / "tools/bench_train.py"), "--worker", worker, "--result", str(result)]
    common = ["--config", args.config, "--ds-config", args.ds_config, "--global-batch", str(args.global_batch)]
    common += ["--eval-every", str(args.eval_every), "--data-seed", str(seed)]
    if worker == "megamm_tp2dp2":
        overrides += ["parallel.tensor_parallel=2", f"micro_batch_size={args.global_batch // 2}"]
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "4"]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        return [*launcher, *script, *common, *overrides], env
    overrides.append(f"micro_batch_size={args.global_batch}")
    env["BENCH_THREADS"] = str(args.threads)
    return [sys.executable, *script, *common, *overrides], env


def run_worker(worker: str, args: argparse.Namespace, seed: int, log_dir: Path) -> Optional[list[RunResult]]:
    """Start one worker as its own process group; None (and the log path printed) if it failed."""
    result_path = log_dir / f"{worker}-seed{seed}.json"
    log_path = log_dir / f"{worker}-seed{seed}.log"
    command, env = _worker_command(worker, args, result_path, seed)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=args.timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(process.pid, 9)
            process.wait()
            raise
    if process.returncode != 0 or not result_path.is_file():
        print(f"  {worker} (seed {seed}) failed with exit {process.returncode}; see {log_path}", file=sys.stderr)
        return None
    results = []
    for raw in json.loads(result_path.read_text()):
        raw["evals"] = [tuple(e) for e in raw["evals"]]
        results.append(RunResult(**raw))
    return results


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def summarise(
    results: dict[str, list[RunResult]], target: float, flops_per_sample: float, peaks: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per run kind: the means and spreads printed in the table (plain numbers, for JSON)."""
    summary: dict[str, dict[str, Any]] = {}
    for run, runs in results.items():
        if not runs:
            continue
        per_step = [{p: r.phase_seconds[p] / r.steps * 1000 for p in PHASES} for r in runs]
        step_ms = [sum(s.values()) for s in per_step]
        rates = [r.global_batch * r.steps / r.train_seconds for r in runs]
        reached = [r.time_to(target) for r in runs]
        summary[run] = {
            "runs": len(runs),
            "step_ms": step_ms,
            "phase_ms": {p: [s[p] for s in per_step] for p in PHASES},
            "samples_per_second": rates,
            "final_R@1": [r.evals[-1][2] for r in runs],
            "final_loss": [r.final_loss for r in runs],
            "seconds_to_target": [t[1] for t in reached if t],
            "steps_to_target": [t[0] for t in reached if t],
            "reached_target": sum(t is not None for t in reached),
            "mfu": {name: [mfu(rate, flops_per_sample, peak) for rate in rates] for name, peak in peaks.items()},
            "loader_samples_per_second": [r.loader_samples_per_second for r in runs if r.loader_samples_per_second],
            "data_share": [r.phase_seconds["data"] / r.train_seconds for r in runs],
        }
    return summary


def _ratio(summary: dict[str, dict[str, Any]], run: str, key: str) -> str:
    base = BASELINE.get(run)
    if base not in summary or not summary[run][key] or not summary[base][key]:
        return "-"
    return f"{statistics.mean(summary[run][key]) / statistics.mean(summary[base][key]):.2f}x"


def render_table(summary: dict[str, dict[str, Any]], target: float, steps: int) -> str:
    """The side-by-side Markdown table (mean ± std over repeats; ratios are megamm / plain)."""
    lines = [
        f"| run | step ms (ratio) | data / fwd / bwd / optim ms | samples/s | MFU fp32 / bf16 peak "
        f"| R@1 at {steps} | steps to R@1 {target} | seconds to R@1 {target} (ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in RUNS:
        if run not in summary:
            continue
        s = summary[run]
        phases = " / ".join(f"{statistics.mean(s['phase_ms'][p]):.1f}" for p in PHASES)
        mfus = " / ".join(f"{100 * statistics.mean(v):.2f}%" for v in s["mfu"].values())
        reached = f"{s['reached_target']}/{s['runs']}: " if s["reached_target"] < s["runs"] else ""
        lines.append(
            f"| {LABELS[run]} | {_mean_std(s['step_ms'])} ({_ratio(summary, run, 'step_ms')}) | {phases} "
            f"| {_mean_std(s['samples_per_second'])} | {mfus} | {_mean_std(s['final_R@1'])} "
            f"| {reached}{_mean_std(s['steps_to_target'])} "
            f"| {reached}{_mean_std(s['seconds_to_target'])} ({_ratio(summary, run, 'seconds_to_target')}) |"
        )
    return "\n".join(lines)


def render_loader(summary: dict[str, dict[str, Any]]) -> str:
    s = summary.get("megamm_loader")
    if not s or not s["loader_samples_per_second"]:
        return ""
    return (
        f"Loader alone: {_mean_std(s['loader_samples_per_second'])} samples/s against training at "
        f"{_mean_std(s['samples_per_second'])} samples/s; waiting for data: "
        f"{100 * statistics.mean(s['data_share']):.1f}% of step time "
        f"({statistics.mean(s['phase_ms']['data']):.2f} ms a step)."
    )


def parent_main(args: argparse.Namespace) -> int:
    config = load_config(args.config, [*args.overrides, f"train_steps={args.steps}"])
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    flops = model_flops_per_sample(config.model, global_batch=args.global_batch)
    peaks = {"fp32": measure_matmul_peak(torch.float32, repeats=5, min_repeat_seconds=0.25)}
    bf16 = measure_matmul_peak(torch.bfloat16, repeats=5, min_repeat_seconds=0.25)
    peaks["bf16"] = max(bf16, peaks["fp32"])
    print(f"matmul peak here: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s")
    print(f"model: {flops.training / 1e6:.2f} MFLOP per training sample (3 x {flops.forward / 1e6:.2f} forward)")
    results: dict[str, list[RunResult]] = {run: [] for worker in args.runs for run in WORKERS[worker]}
    failed = 0
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        for worker in args.runs:
            names = " + ".join(LABELS[run] for run in WORKERS[worker])
            print(f"[{time.strftime('%H:%M:%S')}] {names}, seed {seed} ...", flush=True)
            worker_results = run_worker(worker, args, seed, out / "logs")
            if worker_results is None:
                failed += 1
                continue
            for result in worker_results:
                results[result.name].append(result)
                rate = result.global_batch * result.steps / result.train_seconds
                print(f"  {LABELS[result.name]}: {rate:.0f} samples/s, R@1 {result.evals[-1][2]:.3f}", flush=True)
    summary = summarise(results, args.target, flops.training, peaks)
    table, loader = render_table(summary, args.target, args.steps), render_loader(summary)
    command = "python tools/bench_train.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"
    report = (
        f"# Training benchmark\n\n`{command}`\n\n{time.strftime('%Y-%m-%d')}, {machine}. "
        f"{args.repeats} repeat(s), seeds {args.seed}..{args.seed + args.repeats - 1}; mean ± std.\n\n"
        f"Matmul peak measured in this run: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s. "
        f"Model FLOPs: {flops.training / 1e6:.2f} MFLOP per training sample.\n\n{table}\n\n{loader}\n"
    )
    print("\n" + report)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"summary": summary, "peaks": peaks, "command": command}, indent=1))
    _plot(results, args.target, out / "curves.png")
    return 1 if failed else 0


def _plot(results: dict[str, list[RunResult]], target: float, path: Path) -> None:
    """R@1 against steps and against training seconds, one line per run (each repeat drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for colour, (run, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        for i, r in enumerate(runs):
            steps, seconds, r1 = zip(*r.evals)
            label = LABELS[run] if i == 0 else None
            axes[0].plot(steps, r1, color=colour, alpha=0.8, label=label)
            axes[1].plot(seconds, r1, color=colour, alpha=0.8, label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds (timed steps only)")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out text->image R@1")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="clip_tiny", help="recipe name or YAML path")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero3.json"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.9, help="held-out text->image R@1 to time")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, seeds seed..seed+repeats-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, 1-process runs")
    parser.add_argument("--runs", nargs="+", choices=list(WORKERS), default=list(WORKERS),
                        help="workers to run: pair (plain + megamm 1 proc, alternating), megamm_loader, megamm_tp2dp2")
    parser.add_argument("--out", default="runs/bench_train")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data-seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value for every run")
    args = parser.parse_args(argv)
    if args.global_batch % 2:
        parser.error("--global-batch must be even (the TP=2 x DP=2 run splits it over 2 data-parallel ranks)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker_main(args)
        return 0
    # Stopped from outside (a SIGTERM): leave as Ctrl-C does, through run_worker, which stops the
    # running worker's process group (a session of its own, which a kill of ours would not reach).
    signal.signal(signal.SIGTERM, _interrupt)
    return parent_main(args)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
