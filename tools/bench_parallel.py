#!/usr/bin/env python
"""Tensor-parallel benchmark, in parts: the layers' own overhead, and communication against theory.

``--part layers``: megamm's tensor-parallel layers at TP=1 (no process group: every mapping is the
identity) against plain ``torch.nn`` layers of the same shapes and the same weights, forward +
backward of a given output gradient (no optimizer):

- MLP: ``ColumnParallelLinear -> GELU -> RowParallelLinear`` against ``nn.Linear -> GELU -> nn.Linear``;
- attention: ``megamm.model.attention.ParallelSelfAttention`` against the same scaled-dot-product
  code on ``nn.Linear`` projections;
- embedding: ``VocabParallelEmbedding`` against ``nn.Embedding``, and against ``nn.Embedding`` after
  the same id-range check (``torch._assert_async``) that ``VocabParallelEmbedding`` makes at every TP
  size, which tells that check's cost from the rest;
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
and the same block's weights in Megatron's sequence-parallel form (megamm's layers have no
sequence-parallel mode yet), where megamm's mappings run each reduce-scatter on gloo as an
all-reduce of the same tensor (``as_run``).

``--part bubble`` (the pipeline bubble) is reserved for a third part, not written yet.

Each part writes its section of ``results.json``, ``results.md`` and its own PNG under ``--out``;
sections of other parts already there are kept, so parts can be rerun one at a time.

    python tools/bench_parallel.py --out docs/benchmarks/parallel              # layers and comm
    python tools/bench_parallel.py --part comm --tp 2 4 8 --out runs/bench_parallel
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
    gather_from_sequence,
    reduce_scatter_to_sequence,
)
from megamm.parallel.comm_counter import (  # noqa: E402
    Collective,
    CommCounter,
    as_run,
    predicted_block_comm,
    summarise,
)
from megamm.parallel.mappings import ProcessGroup  # noqa: E402

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


class CheckedEmbedding(nn.Embedding):
    """nn.Embedding with VocabParallelEmbedding's id-range check (``torch._assert_async``) first."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(), "token id out of range")
        return super().forward(ids)


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
        "embedding_checked": (VocabParallelEmbedding(args.vocab, h, None), CheckedEmbedding(args.vocab, h), ids),
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


def time_id_check(ids: torch.Tensor, vocab: int, calls: int = 500) -> float:
    """Seconds per call of VocabParallelEmbedding's id-range check alone."""
    start = time.perf_counter()
    for _ in range(calls):
        torch._assert_async(((ids >= 0) & (ids < vocab)).all(), "token id out of range")
    return (time.perf_counter() - start) / calls


def measure_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Part a: per layer, each repeat's ms per step on both sides and their ratio."""
    torch.set_num_threads(args.threads)
    pairs = build_pairs(args)
    section: dict[str, Any] = {
        "sizes": {k: getattr(args, k) for k in ("batch", "seq", "hidden", "heads", "ffn", "vocab")},
        "threads": args.threads, "min_seconds": args.min_seconds, "repeats": args.repeats, "layers": {},
        "id_check_ms": [],
    }  # fmt: skip
    ids = next(p.inputs for p in pairs if p.name == "embedding")
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
        section["id_check_ms"].append(1000 * time_id_check(ids, args.vocab))
        print(f"  repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{p.name} {section['layers'][p.name]['ratio'][-1]:.3f}x" for p in pairs), flush=True)  # fmt: skip
    for entry in section["layers"].values():
        entry["median_ratio"] = statistics.median(entry["ratio"])
        entry["within_target"] = entry["median_ratio"] <= 1 + TARGET_OVERHEAD
    return section


def _spread(values: list[float], digits: int = 3) -> str:
    """``median [min, max]``."""
    return f"{statistics.median(values):.{digits}g} [{min(values):.{digits}g}, {max(values):.{digits}g}]"


LAYER_LABELS = {
    "mlp": ("Column -> GELU -> Row", "Linear -> GELU -> Linear"),
    "attention": ("ParallelSelfAttention", "same SDPA on nn.Linear"),
    "embedding": ("VocabParallelEmbedding", "nn.Embedding"),
    "embedding_checked": ("VocabParallelEmbedding", "nn.Embedding + the same id-range check"),
    "block": ("TransformerBlock", "plain pre-norm block"),
}


LAYER_TICKS = {"embedding_checked": "embedding vs\nnn.Embedding\n+ same id check"}


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
    check = statistics.median(section["id_check_ms"])
    plain = statistics.median(section["layers"]["embedding"]["plain_ms"])
    lines += [
        "",
        f"VocabParallelEmbedding's id-range check alone (`torch._assert_async` of `((ids >= 0) & (ids < V)).all()`, "
        f"timed apart): {1000 * check:.1f} us a call [{1000 * min(section['id_check_ms']):.1f}, "
        f"{1000 * max(section['id_check_ms']):.1f}], {100 * check / plain:.1f}% of the plain embedding's step.",
    ]
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
    ax.set_xticks(range(len(names)), [LAYER_TICKS.get(name, name) for name in names])
    ax.set_ylabel("step time, megamm / plain torch.nn")
    ax.set_title(f"TP=1 layer overhead, {section['repeats']} repeats (median, min-max)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Part b: communication volume against Megatron's analysis


def sequence_parallel_block(block: TransformerBlock, x_local: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``block``'s weight shards in Megatron's sequence-parallel form: (B, T / tp, H) -> (B, T / tp, H)."""
    attn, mlp = block.attn, block.mlp
    h = gather_from_sequence(block.attn_norm(x_local), group)  # (B, T, H)
    batch, length, _ = h.shape
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(batch, length, 3, attn.local_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, d)
    context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H / tp)
    x_local = x_local + reduce_scatter_to_sequence(F.linear(context, attn.out.weight), group) + attn.out.bias
    h = gather_from_sequence(block.mlp_norm(x_local), group)  # (B, T, H)
    partial = F.linear(F.gelu(F.linear(h, mlp.up.weight, mlp.up.bias)), mlp.down.weight)  # (B, T, H), partial
    return x_local + reduce_scatter_to_sequence(partial, group) + mlp.down.bias  # (B, T / tp, H)


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
        x, upstream = torch.randn(b, t, h), torch.randn(b, t, h)
        own = slice(rank * t // world, (rank + 1) * t // world)
        runs: dict[str, Any] = {}
        for variant, forward, inputs, grad in (
            ("tp", lambda x: block(x), x, upstream),
            ("tp_sp", lambda x: sequence_parallel_block(block, x, state.tp_group), x[:, own], upstream[:, own]),
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
                expected = as_run(predicted.collectives, measured["backend"])
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
                    "predicted_as_run": summarise(expected),
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
        "| ring MB measured / predicted | matches as run | step ms, median [min, max] |",
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
        "\"matches as run\": every step's sequence of (collective, payload bytes, group size) equals the "
        "prediction as megamm's mappings run it on this backend. On gloo they run each reduce-scatter as an "
        "all-reduce of the same full tensor followed by a local split: the sequence-parallel form then "
        "counts all-reduces where Megatron has reduce-scatters, with the predicted payload but twice their "
        "ring bytes.",
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
# Part c: the pipeline bubble (not written yet)


def measure_bubble(args: argparse.Namespace) -> dict[str, Any]:
    raise NotImplementedError("the pipeline-bubble part of this benchmark is not written yet")


def render_bubble(section: dict[str, Any]) -> str:
    raise NotImplementedError


def plot_bubble(section: dict[str, Any], path: Path) -> None:
    raise NotImplementedError


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
READY = ("layers", "comm")


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
        "# Tensor-parallel benchmark",
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
    parser.add_argument("--part", nargs="+", choices=list(PARTS), default=list(READY),
                        help="parts to run (default: %(default)s); bubble is not written yet")  # fmt: skip
    parser.add_argument("--out", default="runs/bench_parallel", help="results.json, results.md and the PNGs")
    sizes = parser.add_argument_group("sizes (both parts)")
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
    args = parser.parse_args(argv)
    args.argv = argv
    if "bubble" in args.part:
        parser.error("--part bubble: the pipeline-bubble part is not written yet")
    if min(args.repeats, args.iters, args.warmup, args.comm_steps) < 1:
        parser.error("--repeats, --iters, --warmup and --comm-steps must be >= 1")
    for tp in args.tp:
        if args.heads % tp or args.seq % tp or args.ffn % tp or args.hidden % tp:
            parser.error(f"--tp {tp} must divide --heads, --seq, --hidden and --ffn")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
