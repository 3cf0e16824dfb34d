#!/usr/bin/env python
"""Parallelism benchmark, in parts: the tensor-parallel layers' own overhead, their communication
against theory, and the pipeline bubble against theory.

``--part layers``: megamm's tensor-parallel layers at TP=1 (no process group: every mapping is the
identity) against plain ``torch.nn`` layers of the same shapes and the same weights, forward +
backward of a given output gradient (no optimizer):

- MLP: ``ColumnParallelLinear -> GELU -> RowParallelLinear`` against ``nn.Linear -> GELU -> nn.Linear``;
- attention: ``megamm.model.attention.ParallelSelfAttention`` against the same scaled-dot-product
  code on ``nn.Linear`` projections;
- embedding: ``VocabParallelEmbedding`` against ``nn.Embedding``;
- block: ``megamm.model.blocks.TransformerBlock`` against a plain pre-norm block of those.

Each pair runs in the same process, alternating iteration by iteration (which goes first alternates
too), so both see the same machine. A repeat times at least ``--iters`` iterations and
``--min-seconds`` of each side (sized from the warm-up); its ratio is megamm's median step time over
the plain layer's (medians, because single steps on a shared VM spike with page faults and
scheduling). The report gives the median ratio over ``--repeats`` and its spread (min, max),
against a target of at most 3% overhead.

``--part comm``: one ``TransformerBlock`` at TP=2 and TP=4 (gloo processes on this machine, file://
rendezvous), forward + backward under ``megamm.parallel.comm_counter.CommCounter``, against
``predicted_block_comm`` (Megatron's analysis): collectives, payload bytes (the full tensors the
collectives operate on) and ring bytes (what each rank sends under the ring cost model) per step;
and the same block, same weights, with ``sequence_parallel=True`` (all-gathers and reduce-scatters,
plus the all-reduces of its replicated parameters' gradients).

``--part bubble``: the bubble of DeepSpeed's 1F1B pipeline schedule against (p - 1) / (m + p - 1).
A DeepSpeed ``PipelineModule`` of ``--stages`` x ``--blocks-per-stage`` identical ``TransformerBlock``
layers (no tensor-parallel group) on one (B, T, H) activation, partitioned uniformly (every stage
alike), the mean of squares as its loss, AdamW through ``megamm.engine.build_engine``, ZeRO stage 0,
fp32, gradient clipping 1.0; one process per stage, gloo on 127.0.0.1, cores / stages threads each.
A step is one ``train_batch`` of m micro-batches of B (``gradient_accumulation_steps`` = m, set
between steps on the same engine by ``set_train_batch_size``); per m, ``--bubble-warmup`` untimed
steps, then ``--bubble-repeats`` timed ones, every m once per repeat in an order that rotates; a
step's time T(m) is the slowest stage's.

In the ideal 1F1B model T(m) = (m + p - 1) t_mb, t_mb one micro-batch's forward + backward on one
stage, and the bubble (the fraction of a step a stage idles) is (T(m) - m t_mb) / T(m) =
(p - 1) / (m + p - 1). The slope of the least-squares line through the median T(m) is t_mb; its
intercept is (p - 1) t_mb plus the work of a step that does not grow with m. Per m, per repeat:

- the bubble with the intercept counted as bubble: (T(m) - m t_mb) / T(m);
- the bubble with the optimizer step removed: (T(m) - c - m t_mb) / (T(m) - c), c the first
  stage's optimizer step (the first stage runs a step's last backward pass, so the step waits for
  its optimizer step), timed inside the same steps: each pipeline instruction of the engine is
  wrapped in a timer;
- the stage idle fraction, timed without the fit: 1 - (time in the forward and backward
  instructions, mean over stages) / T(m).

More stages than cores (``--stages 4`` on 2 cores) time-slice the cores: allowed, and flagged.

Each part writes its section of ``results.json``, ``results.md`` and its own PNG under ``--out``;
sections of other parts already there are kept, so parts can be rerun one at a time.

    python tools/bench_parallel.py --out docs/benchmarks/parallel              # all three parts
    python tools/bench_parallel.py --part comm --tp 2 4 8 --out runs/bench_parallel
    python tools/bench_parallel.py --part bubble --stages 4 --micro-batches 1 2 4 8 16 --out runs/bench_parallel
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.model.attention import ParallelSelfAttention  # noqa: E402
from megamm.model.blocks import TransformerBlock  # noqa: E402
from megamm.model.init import WeightInit  # noqa: E402
from megamm.parallel import (  # noqa: E402
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megamm.parallel.comm_counter import (  # noqa: E402
    Collective,
    CommCounter,
    predicted_block_comm,
    summarise,
)

TARGET_OVERHEAD = 0.03
MB = 1e6


# ----------------------------------------------------------------------------------------------
# Part a: layer overhead at TP=1


class PlainMLP(nn.Module):
    """nn.Linear -> GELU -> nn.Linear. (..., H) -> (..., H)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class PlainSelfAttention(nn.Module):
    """The scaled-dot-product attention of ParallelSelfAttention on nn.Linear projections."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, d)
        context = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d)
        return self.out(context.transpose(1, 2).reshape(batch, length, -1))  # (B, T, H)


class PlainBlock(nn.Module):
    """Pre-norm block of plain layers: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(hidden), PlainSelfAttention(hidden, heads)
        self.mlp_norm, self.mlp = nn.LayerNorm(hidden), PlainMLP(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class MegammMLP(nn.Module):
    """ColumnParallelLinear -> GELU -> RowParallelLinear at TP=1."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.up, self.down = ColumnParallelLinear(hidden, ffn, None), RowParallelLinear(ffn, hidden, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s parameters into ``target``'s, matched in registration order and shape."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=True))
    with torch.no_grad():
        for ours, theirs in pairs:
            theirs.copy_(ours.view_as(theirs))


@dataclass
class Pair:
    """A megamm layer and its plain counterpart, with one input and the output's gradient."""

    name: str
    megamm: nn.Module
    plain: nn.Module
    inputs: torch.Tensor
    upstream: torch.Tensor


def build_pairs(args: argparse.Namespace) -> list[Pair]:
    """The four pairs at the benchmark's sizes, each with the same weights on both sides."""
    torch.manual_seed(0)
    b, t, h = args.batch, args.seq, args.hidden
    x = torch.randn(b, t, h)
    ids = torch.randint(0, args.vocab, (b, t))
    layers = {
        "mlp": (MegammMLP(h, args.ffn), PlainMLP(h, args.ffn), x),
        "attention": (
            ParallelSelfAttention(h, args.heads, None, WeightInit().linear(h), WeightInit().residual(h, 1)),
            PlainSelfAttention(h, args.heads),
            x,
        ),
        "embedding": (VocabParallelEmbedding(args.vocab, h, None), nn.Embedding(args.vocab, h), ids),
        "block": (
            TransformerBlock(h, args.heads, args.ffn, None, WeightInit(), 1), PlainBlock(h, args.heads, args.ffn), x
        ),
    }
    pairs = []
    for name, (ours, plain, inputs) in layers.items():
        with torch.no_grad():  # non-zero biases, so that both sides compute them
            for param in ours.parameters():
                if param.dim() == 1 and not param.any():
                    param.normal_(0, 0.1)
        _copy_weights(ours, plain)
        pairs.append(Pair(name, ours, plain, inputs, torch.randn(b, t, h)))
    return pairs


def _step(module: nn.Module, inputs: torch.Tensor, upstream: torch.Tensor) -> None:
    """Forward and backward of a given output gradient; gradients cleared first, no optimizer."""
    for param in module.parameters():
        param.grad = None
    if inputs.is_floating_point():
        inputs = inputs.detach().requires_grad_()  # the input's gradient too, as in a stack
    module(inputs).backward(upstream)


def time_pair(pair: Pair, iters: int) -> tuple[list[float], list[float]]:
    """Seconds of each of ``iters`` steps of each side, alternating (and which goes first)."""
    seconds: dict[str, list[float]] = {"megamm": [], "plain": []}
    for i in range(iters):
        for side in ("megamm", "plain") if i % 2 == 0 else ("plain", "megamm"):
            module = getattr(pair, side)
            start = time.perf_counter()
            _step(module, pair.inputs, pair.upstream)
            seconds[side].append(time.perf_counter() - start)
    return seconds["megamm"], seconds["plain"]


def measure_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Part a: per layer, each repeat's ms per step on both sides and their ratio."""
    torch.set_num_threads(args.threads)
    pairs = build_pairs(args)
    section: dict[str, Any] = {
        "sizes": {k: getattr(args, k) for k in ("batch", "seq", "hidden", "heads", "ffn", "vocab")},
        "threads": args.threads, "min_seconds": args.min_seconds, "repeats": args.repeats, "layers": {},
    }  # fmt: skip
    iters = {}
    for pair in pairs:
        with torch.no_grad():
            same = (pair.megamm(pair.inputs) - pair.plain(pair.inputs)).abs().max().item()
        ours, plain = time_pair(pair, args.warmup)  # also sizes the repeats: >= --min-seconds a side
        iters[pair.name] = max(args.iters, math.ceil(args.min_seconds / max(statistics.median(ours + plain), 1e-9)))
        section["layers"][pair.name] = {
            "max_abs_output_difference": same, "iters": iters[pair.name], "megamm_ms": [], "plain_ms": [], "ratio": [],
        }  # fmt: skip
    for repeat in range(args.repeats):
        for pair in pairs:
            ours, plain = (statistics.median(seconds) for seconds in time_pair(pair, iters[pair.name]))
            entry = section["layers"][pair.name]
            entry["megamm_ms"].append(1000 * ours)
            entry["plain_ms"].append(1000 * plain)
            entry["ratio"].append(ours / plain)
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{p.name} {section['layers'][p.name]['ratio'][-1]:.3f}x" for p in pairs), flush=True)  # fmt: skip
    for entry in section["layers"].values():
        entry["median_ratio"] = statistics.median(entry["ratio"])
        entry["within_target"] = entry["median_ratio"] <= 1 + TARGET_OVERHEAD
    return section


def _spread(values: list[float], digits: int = 3) -> str:
    """``median [min, max]``."""
    return f"{statistics.median(values):.{digits}g} [{min(values):.{digits}g}, {max(values):.{digits}g}]"


def _spread_fixed(values: list[float], decimals: int) -> str:
    """``median [min, max]`` with ``decimals`` digits after the point."""
    return f"{statistics.median(values):.{decimals}f} [{min(values):.{decimals}f}, {max(values):.{decimals}f}]"


LAYER_LABELS = {
    "mlp": ("Column -> GELU -> Row", "Linear -> GELU -> Linear"),
    "attention": ("ParallelSelfAttention", "same SDPA on nn.Linear"),
    "embedding": ("VocabParallelEmbedding", "nn.Embedding"),
    "block": ("TransformerBlock", "plain pre-norm block"),
}


def render_layers(section: dict[str, Any]) -> str:
    s = section["sizes"]
    lines = [
        f"Forward + backward at TP=1, B={s['batch']} T={s['seq']} H={s['hidden']} heads={s['heads']} "
        f"FFN={s['ffn']} V={s['vocab']}, fp32, {section['threads']} thread(s); {section['repeats']} repeats, each of "
        f"alternating iterations (at least {section['min_seconds']} s a side: the iterations column); a repeat's "
        "ms/step is its median step, its ratio the quotient of the two medians; median [min, max] over repeats. "
        f"Target: ratio <= {1 + TARGET_OVERHEAD:.2f}.",
        "",
        "| layer | megamm | plain | iterations | megamm ms/step | plain ms/step | ratio (megamm / plain) "
        "| within target | max output difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in section["layers"].items():
        ours, plain = LAYER_LABELS[name]
        lines.append(
            f"| {name} | {ours} | {plain} | {e['iters']} | {_spread(e['megamm_ms'])} | {_spread(e['plain_ms'])} "
            f"| **{e['median_ratio']:.3f}x** [{min(e['ratio']):.3f}, {max(e['ratio']):.3f}] "
            f"| {'yes' if e['within_target'] else 'no'} | {e['max_abs_output_difference']:.1e} |"
        )
    return "\n".join(lines)


def plot_layers(section: dict[str, Any], path: Path) -> None:
    """Median ratio per layer, min-max as error bars, each repeat as a dot, the target as a line."""
    plt = _pyplot()
    names = list(section["layers"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, name in enumerate(names):
        ratios = section["layers"][name]["ratio"]
        median = statistics.median(ratios)
        ax.bar(i, median - 1, bottom=1, color="#1f77b4", alpha=0.7)
        ax.errorbar(i, median, yerr=[[median - min(ratios)], [max(ratios) - median]], color="black", capsize=4)
        ax.scatter([i] * len(ratios), ratios, color="black", s=8, zorder=3)
        ax.text(i, max(ratios), f"{median:.3f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=1)
    target = 1 + TARGET_OVERHEAD
    ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:.2f}x")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("step time, megamm / plain torch.nn")
    ax.set_title(f"TP=1 layer overhead, {section['repeats']} repeats (median, min-max)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Part b: communication volume against Megatron's analysis


def comm_worker(rank: int, world: int, init_file: str, sizes: dict[str, int], steps: int, result: str) -> None:
    """One rank: ``steps`` counted forward + backward steps of the block, plain and sequence parallel."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = ParallelState.initialize(tensor_parallel=world)
        b, t, h = sizes["batch"], sizes["seq"], sizes["hidden"]
        torch.manual_seed(0)
        block = TransformerBlock(h, sizes["heads"], sizes["ffn"], state.tp_group, WeightInit(), 1)
        sp_block = TransformerBlock(h, sizes["heads"], sizes["ffn"], state.tp_group, WeightInit(), 1, sequence_parallel=True)
        sp_block.load_state_dict(block.state_dict())
        x, upstream = torch.randn(b, t, h), torch.randn(b, t, h)
        own = slice(rank * t // world, (rank + 1) * t // world)
        runs: dict[str, Any] = {}
        for variant, forward, inputs, grad in (
            ("tp", block, x, upstream),
            ("tp_sp", sp_block, x[:, own], upstream[:, own]),
        ):
            forward(inputs.detach().requires_grad_()).backward(grad)  # warm-up: first-call costs, uncounted
            steps_out = []
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                with CommCounter() as counter:
                    out = forward(inputs.detach().requires_grad_())
                    out.backward(grad)
                seconds = time.perf_counter() - start
                steps_out.append({
                    "seconds": seconds,
                    "records": [[c.kind, c.op, c.payload_bytes, c.group_size, c.ring_bytes] for c in counter.records],
                })  # fmt: skip
            runs[variant] = steps_out
        runs["backend"] = dist.get_backend(state.tp_group)
        if rank == 0:
            Path(result).write_text(json.dumps(runs))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_comm(world: int, sizes: dict[str, int], steps: int, workdir: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    result = workdir / f"comm-tp{world}.json"
    init_file = str(workdir / f"rendezvous-tp{world}")
    mp.spawn(comm_worker, args=(world, init_file, sizes, steps, str(result)), nprocs=world, join=True)
    return json.loads(result.read_text())


def measure_comm(args: argparse.Namespace) -> dict[str, Any]:
    """Part b: per TP size and variant, the collectives of each step against the prediction."""
    sizes = {k: getattr(args, k) for k in ("batch", "seq", "hidden", "heads", "ffn")}
    section: dict[str, Any] = {"sizes": sizes, "steps": args.comm_steps, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_parallel-") as workdir:
        for tp in args.tp:
            print(f"  TP={tp}: {tp} gloo processes ...", flush=True)
            measured = _spawn_comm(tp, sizes, args.comm_steps, Path(workdir))
            for variant in ("tp", "tp_sp"):
                sequence_parallel = variant == "tp_sp"
                predicted = predicted_block_comm(
                    args.batch, args.seq, args.hidden, tp, sequence_parallel, bytes_per_element=4
                )
                expected = predicted.collectives
                steps = measured[variant]
                records = [[Collective(k, p, g, op) for k, op, p, g, _ in step["records"]] for step in steps]
                first = records[0]
                signatures = [[c.signature() for c in r] for r in records]
                section["runs"].append({
                    "tp": tp,
                    "sequence_parallel": sequence_parallel,
                    "backend": measured["backend"],
                    "step_ms": [1000 * s["seconds"] for s in steps],
                    "steps_identical": all(sig == signatures[0] for sig in signatures),
                    "measured": summarise(first),
                    "measured_ops": [c.op for c in first],
                    "predicted": predicted.summary(),
                    "predicted_kinds": [c.kind for c in predicted.collectives],
                    "predicted_parameter_gradients": summarise(predicted.parameter_gradients),
                    "matches_prediction": [c.signature() for c in first] == [c.signature() for c in expected],
                })  # fmt: skip
    return section


def render_comm(section: dict[str, Any]) -> str:
    s = section["sizes"]
    activation = s["batch"] * s["seq"] * s["hidden"] * 4
    lines = [
        f"One TransformerBlock, B={s['batch']} T={s['seq']} H={s['hidden']} heads={s['heads']} FFN={s['ffn']}, fp32: "
        f"one (B, T, H) activation is {activation / MB:.3f} MB. Per rank and step (forward + backward), "
        f"{section['steps']} steps each, every step alike. Payload: the full tensors the collectives operate "
        "on; ring: what each rank sends under the ring cost model. MB = 10^6 bytes.",
        "",
        "| TP | form | collectives measured | predicted (Megatron) | payload MB measured / predicted "
        "| ring MB measured / predicted | matches, call for call | step ms, median [min, max] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in section["runs"]:
        m, p = run["measured"], run["predicted"]
        counts = ", ".join(f"{v['count']} {k}" for k, v in m.items() if k != "total")
        pred = ", ".join(f"{v['count']} {k}" for k, v in p.items() if k != "total")
        form = "sequence parallel" if run["sequence_parallel"] else "tensor parallel"
        matches = "yes" if run["matches_prediction"] and run["steps_identical"] else "**no**"
        lines.append(
            f"| {run['tp']} | {form} | {counts} | {pred} "
            f"| {m['total']['payload_bytes'] / MB:.3f} / {p['total']['payload_bytes'] / MB:.3f} "
            f"| {m['total']['ring_bytes'] / MB:.3f} / {p['total']['ring_bytes'] / MB:.3f} "
            f"| {matches} | {_spread(run['step_ms'])} |"
        )
    lines += [
        "",
        "\"matches, call for call\": every step's sequence of (collective, payload bytes, group size) equals "
        "the prediction's. With sequence parallelism, 4 of the all-reduces sum the gradients of the parameters "
        f"every rank holds whole (2 LayerNorms' weights and biases, 2 row-parallel biases: {6 * s['hidden'] * 4} "
        "bytes in all); the rest are Megatron's activation collectives.",
    ]
    return "\n".join(lines)


def plot_comm(section: dict[str, Any], path: Path) -> None:
    """Measured and predicted MB per rank and step, per TP size and form: payload, and ring bytes."""
    plt = _pyplot()
    runs = section["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = list(range(len(runs)))
    labels = [f"TP={r['tp']}\n{'SP' if r['sequence_parallel'] else 'no SP'}" for r in runs]
    for ax, key, title in (
        (axes[0], "payload_bytes", "payload: the full tensors operated on"),
        (axes[1], "ring_bytes", "ring model: bytes each rank sends"),
    ):
        measured = [r["measured"]["total"][key] / MB for r in runs]
        predicted = [r["predicted"]["total"][key] / MB for r in runs]
        ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured (CommCounter)", color="#1f77b4")
        ax.bar([i + 0.2 for i in x], predicted, width=0.4, label="predicted (Megatron)", color="#aaaaaa")
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 1.3 * max(measured + predicted))  # room for the legend
        ax.set_ylabel("MB per rank per step")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("TransformerBlock forward + backward on gloo (SP: its reduce-scatters run as all-reduces)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Part c: the pipeline bubble against (p - 1) / (m + p - 1)

COMPUTE = ("ForwardPass", "BackwardPass")
"""DeepSpeed's pipeline instructions that compute (the rest send, receive, load or step)."""
END_OF_STEP = ("ReduceTiedGrads", "ReduceGrads", "OptimizerStep")
"""The instructions that end a step on every stage: gradient reductions (none at DP=1), the optimizer."""


def predicted_bubble(micro_batches: int, stages: int) -> float:
    """The idle fraction of a balanced 1F1B pipeline without fixed costs: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def squared_mean(outputs: torch.Tensor, labels: Any) -> torch.Tensor:
    """The pipeline's loss: the mean of the squared last activation (the labels are placeholders)."""
    return outputs.pow(2).mean()


def _time_instructions(engine: Any, seconds: dict[str, float]) -> None:
    """Make ``engine`` add the seconds each pipeline instruction takes to ``seconds[name]``.

    ``PipelineEngine._exec_schedule`` looks each instruction up in ``self._INSTRUCTION_MAP``; an
    instance attribute of that name, with every method wrapped in a timer, shadows the class's.
    """
    timed = {}
    for kind, execute in type(engine)._INSTRUCTION_MAP.items():

        def run(self: Any, *args: Any, _execute: Callable[..., Any] = execute, _name: str = kind.__name__,
                **kwargs: Any) -> Any:  # fmt: skip
            start = time.perf_counter()
            try:
                return _execute(self, *args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start

        timed[kind] = run
    engine._INSTRUCTION_MAP = timed


def bubble_worker(
    rank: int, world: int, port: int, sizes: dict[str, int], plan: dict[str, Any], result: str
) -> None:
    """One stage: a PipelineEngine of identical TransformerBlocks, ``train_batch`` timed at every m."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import logging

    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.utils import logger as deepspeed_logger

    from megamm.config import OptimConfig
    from megamm.engine import build_engine, init_distributed

    deepspeed_logger.setLevel(logging.WARNING)
    init_distributed()
    torch.set_num_threads(plan["threads"])
    parallel = ParallelState.initialize(tensor_parallel=1, pipeline_parallel=world)
    b, t, h = sizes["batch"], sizes["seq"], sizes["hidden"]
    blocks = world * plan["blocks_per_stage"]
    torch.manual_seed(0)
    specs = [LayerSpec(TransformerBlock, h, sizes["heads"], sizes["ffn"], None, WeightInit(), blocks)
             for _ in range(blocks)]  # fmt: skip
    model = PipelineModule(layers=specs, num_stages=world, loss_fn=squared_mean, partition_method="uniform")
    ms = plan["micro_batches"]
    ds_config = {
        "train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": ms[0],
        "zero_optimization": {"stage": plan["zero_stage"]}, "gradient_clipping": 1.0, "steps_per_print": 1 << 30,
    }  # fmt: skip
    engine = build_engine(model, OptimConfig(lr=1e-4, warmup_steps=0), 1 << 30, ds_config, parallel)
    seconds: dict[str, float] = {}
    _time_instructions(engine, seconds)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, t, h, generator=generator), torch.zeros(1)) for _ in range(max(ms))]

    def step(m: int) -> dict[str, Any]:
        engine.set_train_batch_size(m * b)  # m micro-batches of B: gradient_accumulation_steps = m
        seconds.clear()
        dist.barrier()
        start = time.perf_counter()
        loss = engine.train_batch(iter(data[:m]))
        total = time.perf_counter() - start
        return {"step_ms": 1000 * total, "loss": float(loss), **{k: 1000 * v for k, v in seconds.items()}}

    for m in ms:
        for _ in range(plan["warmup"]):
            step(m)
    steps: dict[int, list[dict[str, Any]]] = {m: [] for m in ms}  # per m, per repeat: step and instruction ms
    for repeat in range(plan["repeats"]):
        for m in ms[repeat % len(ms):] + ms[: repeat % len(ms)]:  # the order rotates: drift hits every m alike
            steps[m].append(step(m))
        if rank == 0:
            print(f"  repeat {repeat + 1}/{plan['repeats']}: " + ", ".join(
                f"m={m} {steps[m][-1]['step_ms']:.0f} ms" for m in ms), flush=True)  # fmt: skip
    stages: list[Any] = [None] * world
    dist.all_gather_object(stages, {"stage": engine.stage_id, "layers": list(model.parts), "steps": steps})
    if rank == 0:
        Path(result).write_text(json.dumps({"stages": stages, "threads": torch.get_num_threads()}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a DeepSpeed engine's teardown can abort in a C++ destructor after a clean run


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def analyse_bubble(stages: list[dict[str, Any]], micro_batches: list[int]) -> dict[str, Any]:
    """Per m: step times, the bubble three ways (see the module docstring); the fit and the fixed step work.

    ``stages``: per stage, ``steps[m]`` is a list (over repeats) of ``{"step_ms", instruction: ms}``.
    """
    p = len(stages)
    stages = sorted(stages, key=lambda s: s["stage"])
    per_m: dict[int, dict[str, Any]] = {}
    for m in micro_batches:
        runs = [s["steps"][str(m)] for s in stages]  # JSON's keys are strings
        repeats = len(runs[0])
        step_ms = [max(run[r]["step_ms"] for run in runs) for r in range(repeats)]  # the slowest stage's
        compute = [[sum(run[r].get(k, 0.0) for k in COMPUTE) for r in range(repeats)] for run in runs]
        per_m[m] = {
            "step_ms": step_ms,
            "compute_ms": compute,  # per stage, per repeat: time in ForwardPass + BackwardPass
            "end_of_step_ms": [[sum(run[r].get(k, 0.0) for k in END_OF_STEP) for r in range(repeats)] for run in runs],
            "idle": [1 - statistics.fmean(c[r] for c in compute) / step_ms[r] for r in range(repeats)],
            "compute_per_micro_batch": [[v / m for v in c] for c in compute],
            "instructions_ms": [  # per stage: each instruction's median ms over the repeats
                {k: statistics.median(step.get(k, 0.0) for step in run) for k in run[0] if k not in ("step_ms", "loss")}
                for run in runs
            ],
            "loss": runs[0][-1]["loss"],
        }  # fmt: skip
    intercept, slope = _fit_line([float(m) for m in micro_batches],
                                 [statistics.median(per_m[m]["step_ms"]) for m in micro_batches])  # fmt: skip
    # The first stage runs the last backward pass of a step, so its optimizer step is the one the step waits for.
    fixed = statistics.median(v for m in micro_batches for v in per_m[m]["end_of_step_ms"][0])
    runs = []
    for m in micro_batches:
        e = per_m[m]
        runs.append({
            "micro_batches": m,
            "step_ms": e["step_ms"],
            "fit_ms": intercept + slope * m,
            "predicted": predicted_bubble(m, p),
            "bubble_fit": [(t - m * slope) / t for t in e["step_ms"]],
            "bubble_fit_net": [(t - fixed - m * slope) / (t - fixed) for t in e["step_ms"]],
            "idle_timed": e["idle"],
            "compute_ms_per_micro_batch": [statistics.median(c) / m for c in e["compute_ms"]],
            "stage_instructions_ms": e["instructions_ms"],
            "last_loss": e["loss"],
        })  # fmt: skip
    compute_per_mb = [statistics.median(v for m in micro_batches for v in per_m[m]["compute_per_micro_batch"][s])
                      for s in range(p)]  # fmt: skip
    parts = stages[0]["layers"]
    end_of_step = [statistics.median(v for m in micro_batches for v in per_m[m]["end_of_step_ms"][s]) for s in range(p)]
    return {
        "stages": p,
        "layers_per_stage": [parts[i + 1] - parts[i] for i in range(p)],
        "fit": {
            "slope_ms": slope, "intercept_ms": intercept, "fill_drain_ms": (p - 1) * slope,
            "optimizer_step_ms": fixed, "residual_ms": intercept - (p - 1) * slope - fixed,
        },  # fmt: skip
        "compute_ms_per_micro_batch": compute_per_mb,  # per stage: ForwardPass + BackwardPass time / m, median
        "end_of_step_ms": end_of_step,  # per stage: gradient reductions + optimizer step, median
        "runs": runs,
    }


def measure_bubble(args: argparse.Namespace) -> dict[str, Any]:
    """Part c: ``train_batch`` of a balanced pipeline at every m, ``--stages`` processes on this machine."""
    import torch.multiprocessing as mp

    from megamm.engine import free_port

    sizes = {k: getattr(args, k) for k in ("batch", "seq", "hidden", "heads", "ffn")}
    cores = os.cpu_count() or 1
    plan = {
        "micro_batches": list(args.micro_batches), "blocks_per_stage": args.blocks_per_stage,
        "repeats": args.bubble_repeats, "warmup": args.bubble_warmup, "zero_stage": 0,
        "threads": max(1, cores // args.stages),
    }  # fmt: skip
    if args.stages > cores:
        print(f"  warning: {args.stages} stages on {cores} cores: the stages share cores, the bubble is not "
              "measured idle time but time-slicing", flush=True)  # fmt: skip
    print(f"  {args.stages} stages x {args.blocks_per_stage} TransformerBlocks, gloo processes ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_parallel-") as workdir:
        result = Path(workdir) / "bubble.json"
        mp.spawn(bubble_worker, args=(args.stages, free_port(), sizes, plan, str(result)), nprocs=args.stages,
                 join=True)  # fmt: skip
        raw = json.loads(result.read_text())
    section = analyse_bubble(raw["stages"], plan["micro_batches"])
    section.update(sizes=sizes, threads=raw["threads"], cores=cores, oversubscribed=args.stages > cores,
                   **{k: plan[k] for k in ("blocks_per_stage", "repeats", "warmup", "zero_stage")})  # fmt: skip
    return section


def render_bubble(section: dict[str, Any]) -> str:
    s, fit, p = section["sizes"], section["fit"], section["stages"]
    blocks = p * section["blocks_per_stage"]
    per_mb = ", ".join(f"{v:.3g}" for v in section["compute_ms_per_micro_batch"])
    lines = [
        f"A DeepSpeed PipelineModule of {blocks} identical TransformerBlocks (B={s['batch']} T={s['seq']} "
        f"H={s['hidden']} heads={s['heads']} FFN={s['ffn']}, fp32) on one (B, T, H) activation, "
        f"partition_method uniform: p={p} stages of {section['blocks_per_stage']} blocks, one process each "
        f"({section['threads']} thread(s); {section['cores']} cores"
        f"{', **oversubscribed**' if section['oversubscribed'] else ''}), gloo on 127.0.0.1; loss: mean of squares; "
        f"AdamW through megamm.engine.build_engine, ZeRO stage {section['zero_stage']}. A step is one "
        "`train_batch` of m micro-batches of B (gradient_accumulation_steps = m): DeepSpeed's 1F1B "
        f"TrainSchedule. {section['warmup']} warm-up steps per m, then {section['repeats']} repeats of every m "
        "(the order rotates from repeat to repeat); a step's time is the slowest stage's; median [min, max] "
        "over repeats.",
        "",
        f"Fit of the median step times: T(m) = {fit['intercept_ms']:.4g} ms + m x {fit['slope_ms']:.4g} ms. "
        "The slope is t_mb, one micro-batch's forward + backward on a stage with its sends and receives "
        f"(timed compute alone, per stage: {per_mb} ms). The intercept = (p-1) t_mb = "
        f"{fit['fill_drain_ms']:.4g} ms, + the first stage's optimizer step (timed inside the same steps) "
        f"{fit['optimizer_step_ms']:.3g} ms, + a residual of {fit['residual_ms']:.3g} ms. The optimizer step "
        "clips the gradients (gradient_clipping 1.0, as megamm trains), their norm all-reduced over the stages, "
        "so the other stages wait in it for the first stage's last backward pass: optimizer step per stage "
        f"{', '.join(f'{v:.3g}' for v in section['end_of_step_ms'])} ms (gradient reductions included).",
        "",
        "| m | step ms | fit ms | predicted (p-1)/(m+p-1) | bubble, intercept counted as bubble "
        "| bubble, optimizer step removed | stage idle, timed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in section["runs"]:
        ms = 0 if statistics.median(r["step_ms"]) >= 100 else 1
        lines.append(
            f"| {r['micro_batches']} | {_spread_fixed(r['step_ms'], ms)} | {r['fit_ms']:.{ms}f} "
            f"| **{r['predicted']:.3f}** | **{_spread_fixed(r['bubble_fit'], 3)}** "
            f"| {_spread_fixed(r['bubble_fit_net'], 3)} | {_spread_fixed(r['idle_timed'], 3)} |"
        )
    lines += [
        "",
        "Bubble, intercept counted as bubble: (T(m) - m t_mb) / T(m), per repeat, with t_mb the slope: "
        "everything in a step that does not grow with m is idle time. Optimizer step removed: "
        "(T(m) - c - m t_mb) / (T(m) - c), with c the first stage's optimizer step (its gradient reductions "
        "included). Stage idle, timed: 1 - (time in ForwardPass and BackwardPass, mean over stages) / T(m), "
        "without the fit: sends, receives, waiting and the optimizer step count as idle.",
    ]
    return "\n".join(lines)


def plot_bubble(section: dict[str, Any], path: Path) -> None:
    """Left: step time against m, each repeat, the fit and ideal 1F1B. Right: measured and predicted bubble."""
    plt = _pyplot()
    runs, fit, p = section["runs"], section["fit"], section["stages"]
    ms = [r["micro_batches"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        left.scatter([r["micro_batches"]] * len(r["step_ms"]), r["step_ms"], color="black", s=6, alpha=0.5)
    left.plot(ms, [statistics.median(r["step_ms"]) for r in runs], "o", color="#1f77b4", label="median step")
    left.plot(ms, [r["fit_ms"] for r in runs], "-", color="#1f77b4",
              label=f"fit {fit['intercept_ms']:.0f} + {fit['slope_ms']:.1f} m ms")  # fmt: skip
    left.plot(ms, [(m + p - 1) * fit["slope_ms"] for m in ms], "--", color="grey",
              label="ideal 1F1B (m + p - 1) t_mb, t_mb = slope")  # fmt: skip
    left.set_xlabel("micro-batches m")
    left.set_ylabel("train_batch ms")
    left.set_title("step time", fontsize=9)
    left.legend(fontsize=8)
    for key, label, color, shift in (
        ("bubble_fit", "measured: intercept counted as bubble", "#1f77b4", 0.97),
        ("bubble_fit_net", "measured: optimizer step removed", "#2ca02c", 1.0),
        ("idle_timed", "stage idle, timed", "#ff7f0e", 1.03),
    ):
        medians = [statistics.median(r[key]) for r in runs]
        low = [med - min(r[key]) for med, r in zip(medians, runs)]
        high = [max(r[key]) - med for med, r in zip(medians, runs)]
        right.errorbar([m * shift for m in ms], medians, yerr=[low, high], fmt="o-", color=color, capsize=3,
                       markersize=4, linewidth=1, label=label)  # fmt: skip
    right.plot(ms, [r["predicted"] for r in runs], "s--", color="black", label=f"predicted (p-1)/(m+p-1), p={p}")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.grid(alpha=0.3)
    right.set_ylim(0, 1)
    right.set_xlabel("micro-batches m")
    right.set_ylabel("bubble: idle fraction of a step")
    right.set_title("pipeline bubble (median, min-max over repeats)", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(f"DeepSpeed 1F1B pipeline, {p} stages x {section['blocks_per_stage']} TransformerBlocks, gloo on CPU",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The parts, the report, the command line


@dataclass(frozen=True)
class Part:
    """One part of the benchmark: measure (a JSON-able section), render it (Markdown), plot it (PNG)."""

    title: str
    measure: Callable[[argparse.Namespace], dict[str, Any]]
    render: Callable[[dict[str, Any]], str]
    plot: Callable[[dict[str, Any], Path], None]
    figure: str


PARTS: dict[str, Part] = {
    "layers": Part("Layer overhead at TP=1", measure_layers, render_layers, plot_layers, "layers.png"),
    "comm": Part("Communication against Megatron's analysis", measure_comm, render_comm, plot_comm, "comm.png"),
    "bubble": Part("Pipeline bubble", measure_bubble, render_bubble, plot_bubble, "bubble.png"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine() -> dict[str, Any]:
    """This machine: CPU model (lscpu), core count (nproc), versions."""
    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model, "nproc": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }  # fmt: skip


def render_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        "# Parallelism benchmark",
        "",
        f"{m['arch']}, {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}.",
    ]
    for name, part in PARTS.items():
        section = results["parts"].get(name)
        if section:
            when = f"`{section['command']}`, {section['date']}, {section.get('seconds', 0):.0f} s."
            parts += ["", f"## {part.title}", "", when, "",
                      part.render(section), "", f"![{name}]({part.figure})"]  # fmt: skip
    return "\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"parts": {}}
    results["machine"] = machine()
    command = "python tools/bench_parallel.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    status = 0
    for name in args.part:
        part = PARTS[name]
        print(f"[{time.strftime('%H:%M:%S')}] {part.title} ...", flush=True)
        start = time.perf_counter()
        section = part.measure(args)
        section.update(command=command, date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - start)
        results["parts"][name] = section
        part.plot(section, out / part.figure)
        if name == "comm" and not all(r["matches_prediction"] and r["steps_identical"] for r in section["runs"]):
            status = 1
    report = render_report(results)
    print("\n" + report)
    results_path.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report)
    return status


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="parts to run (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench_parallel", help="results.json, results.md and the PNGs")
    sizes = parser.add_argument_group("sizes (every part)")
    sizes.add_argument("--batch", type=int, default=8)
    sizes.add_argument("--seq", type=int, default=128)
    sizes.add_argument("--hidden", type=int, default=256)
    sizes.add_argument("--heads", type=int, default=8)
    sizes.add_argument("--ffn", type=int, default=1024)
    sizes.add_argument("--vocab", type=int, default=8192, help="embedding rows (layers part)")
    layers = parser.add_argument_group("layers part")
    layers.add_argument("--repeats", type=int, default=15, help="repeats; the ratio is their median")
    layers.add_argument("--iters", type=int, default=10, help="at least this many iterations of each side per repeat")
    layers.add_argument("--min-seconds", type=float, default=0.75,
                        help="and at least this many seconds of each side per repeat (sized from the warm-up)")
    layers.add_argument("--warmup", type=int, default=4, help="untimed iterations of each side first")
    layers.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    comm = parser.add_argument_group("comm part")
    comm.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="tensor-parallel sizes (processes)")
    comm.add_argument("--comm-steps", type=int, default=3, help="counted steps per TP size and form")
    bubble = parser.add_argument_group("bubble part")
    bubble.add_argument("--stages", type=int, default=2,
                        help="pipeline stages, one process each (more than the cores oversubscribe them)")
    bubble.add_argument("--blocks-per-stage", type=int, default=2, help="TransformerBlocks per stage")
    bubble.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="micro-batch counts m per step (at least two, for the fit)")
    bubble.add_argument("--bubble-repeats", type=int, default=15, help="timed steps per m")
    bubble.add_argument("--bubble-warmup", type=int, default=2, help="untimed steps per m first")  # fmt: skip
    args = parser.parse_args(argv)
    args.argv = argv
    if min(args.repeats, args.iters, args.warmup, args.comm_steps, args.blocks_per_stage, args.bubble_repeats) < 1:
        parser.error("--repeats, --iters, --warmup, --comm-steps, --blocks-per-stage and --bubble-repeats must be >= 1")
    if args.bubble_warmup < 0:
        parser.error("--bubble-warmup must be >= 0")
    if args.stages < 2:
        parser.error("--stages must be >= 2: a pipeline of one stage has no bubble")
    args.micro_batches = sorted(set(args.micro_batches))
    if len(args.micro_batches) < 2 or args.micro_batches[0] < 1:
        parser.error("--micro-batches needs at least two different counts >= 1 (the fit's slope)")
    for tp in args.tp:
        if args.heads % tp or args.seq % tp or args.ffn % tp or args.hidden % tp:
            parser.error(f"--tp {tp} must divide --heads, --seq, --hidden and --ffn")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
