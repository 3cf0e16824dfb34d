"""Every tensor-parallel layer and mapping at TP 1, 2 and 4 against one process (gloo, CPU, fp32).

The reference is built from the same full weights with plain ``torch.nn.functional`` ops (``F.linear``,
``F.embedding``, ``F.cross_entropy``) on the whole tensors; each rank's outputs, input gradients and
weight-gradient shards must equal the reference's, sliced with :func:`megamm.parallel.shard_of` (or
along the sequence for sequence-parallel tensors). The tensor-parallel layers get the full weights
through their ``init_method`` and slice them themselves. A second oracle is fairscale's Megatron-style
model-parallel layers and cross entropy on the same weights, at TP 2 and 4.

Sequence parallelism is Megatron's: outside the tensor-parallel matmuls each rank holds a slice of the
sequence, ``gather_from_sequence`` takes the place of the column-parallel layer's ``copy_to_group``, and
``reduce_scatter_to_sequence`` that of the row-parallel layer's all-reduce: the sequence-parallel cases
run ``ColumnParallelLinear`` and ``RowParallelLinear`` with ``sequence_parallel=True``, on each rank's
slice of the sequence.

Each spawn of ``tp`` processes runs every check of its kind, and reports every failing one.

Already covered in ``tests/test_parallel.py`` and not repeated here: the column -> row MLP at TP 2, the
vocab-parallel cross entropy on given logits (float64, every reduction, huge logits), the hand-written
sequence-parallel MLP with its LayerNorm at TP 1, 2, 4, and fairscale's column -> row MLP at TP 2.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    scatter_to_sequence,
    shard_of,
    vocab_parallel_cross_entropy,
)
from megamm.parallel.mappings import ProcessGroup
from tests.distributed import run_distributed

BATCH, SEQ, HIDDEN, FFN, VOCAB = 2, 8, 8, 16, 32  # SEQ, HIDDEN, FFN and VOCAB divisible by 4
TOL = {"atol": 2e-5, "rtol": 2e-5}


@dataclass(frozen=True)
class Rank:
    """This process's place in its tensor-parallel group, and the slices it owns."""

    rank: int
    tp: int
    group: ProcessGroup

    def shard(self, full: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
        """This rank's tensor-parallel slice of ``full`` (what a sharded parameter holds)."""
        return shard_of(full, self.rank, self.tp, dim, stride)

    @property
    def own(self) -> slice:
        """This rank's slice of the sequence under sequence parallelism."""
        return slice(self.rank * SEQ // self.tp, (self.rank + 1) * SEQ // self.tp)

    def sum_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        if self.tp > 1:
            dist.all_reduce(summed, group=self.group)
        return summed


def _random(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """The same numbers on every rank."""
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_()


def _copying(*blocks: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """An ``init_method`` that fills the masters a layer draws, in order, with ``blocks``."""
    queue = list(blocks)

    def init(master: torch.Tensor) -> None:
        with torch.no_grad():
            master.copy_(queue.pop(0))

    return init


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _run_checks(checks: dict[str, Callable[[], None]], rank: int) -> None:
    """Run every check; raise one error naming each that failed (with its first lines)."""
    failures = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError as error:
            failures.append(f"{name}: {str(error).splitlines()[0]}")
        except Exception:  # a crash is a failure of that check too, with its traceback
            failures.append(f"{name}: {traceback.format_exc()}")
    assert not failures, f"rank {rank}, {len(failures)} of {len(checks)} checks failed:\n" + "\n".join(failures)


# --------------------------------------------------------------------------------------------
# Against the single-process reference


def _column(r: Rank, gather_output: bool, stacked: int, sequence_parallel: bool) -> None:
    """y = x W^T + b, W (out, H) split by rows; stacked=3 is the fused Q/K/V projection."""
    out = 3 * HIDDEN if stacked == 3 else FFN
    weight, bias = _random(1, out, HIDDEN, scale=HIDDEN**-0.5), _random(2, out)
    x, upstream = _random(3, BATCH, SEQ, HIDDEN), _random(4, BATCH, SEQ, out)  # upstream: dL/dy

    ref_w, ref_b, ref_x = _leaf(weight), _leaf(bias), _leaf(x)
    ref_y = F.linear(ref_x, ref_w, ref_b)  # (B, T, out)
    (ref_y * upstream).sum().backward()

    layer = ColumnParallelLinear(
        HIDDEN, out, r.group, gather_output=gather_output, init_method=_copying(*weight.chunk(stacked)), stacked=stacked,
        sequence_parallel=sequence_parallel,
    )
    with torch.no_grad():
        layer.bias.copy_(r.shard(bias, 0, stacked))
    if sequence_parallel:
        x_in = _leaf(x[:, r.own])  # (B, T / tp, H): this rank's slice of the sequence
        expected_x_grad = ref_x.grad[:, r.own]
    else:
        x_in = _leaf(x)  # (B, T, H), replicated
        expected_x_grad = ref_x.grad
    y = layer(x_in)  # (B, T, out) gathered, else (B, T, out / tp)
    expected_y = ref_y.detach() if gather_output else r.shard(ref_y.detach(), -1, stacked)
    (y * (upstream if gather_output else r.shard(upstream, -1, stacked))).sum().backward()

    _close(y, expected_y, "output")
    _close(x_in.grad, expected_x_grad, "input gradient")
    _close(layer.weight.grad, r.shard(ref_w.grad, 0, stacked), "weight gradient shard")
    _close(layer.bias.grad, r.shard(ref_b.grad, 0, stacked), "bias gradient shard")


def _row(r: Rank, input_is_parallel: bool, sequence_parallel: bool) -> None:
    """y = h W^T + b, W (H, FFN) split by columns; b replicated, added after the reduction."""
    weight, bias = _random(11, HIDDEN, FFN, scale=FFN**-0.5), _random(12, HIDDEN)
    h, upstream = _random(13, BATCH, SEQ, FFN), _random(14, BATCH, SEQ, HIDDEN)

    ref_w, ref_b, ref_h = _leaf(weight), _leaf(bias), _leaf(h)
    ref_y = F.linear(ref_h, ref_w, ref_b)  # (B, T, H)
    (ref_y * upstream).sum().backward()

    layer = RowParallelLinear(
        FFN, HIDDEN, r.group, input_is_parallel=input_is_parallel, init_method=_copying(weight),
        sequence_parallel=sequence_parallel,
    )
    with torch.no_grad():
        layer.bias.copy_(bias)
    h_in = _leaf(r.shard(h, -1) if input_is_parallel else h)  # (B, T, FFN / tp) or (B, T, FFN)
    y = layer(h_in)  # (B, T / tp, H) this rank's slice of the sequence, else (B, T, H) replicated
    expected_y = ref_y.detach()[:, r.own] if sequence_parallel else ref_y.detach()
    (y * (upstream[:, r.own] if sequence_parallel else upstream)).sum().backward()

    _close(y, expected_y, "output")
    _close(h_in.grad, r.shard(ref_h.grad, -1) if input_is_parallel else ref_h.grad, "input gradient")
    _close(layer.weight.grad, r.shard(ref_w.grad, 1), "weight gradient shard")
    # Under sequence parallelism each rank adds the bias to its slice; the layer sums the slices'
    # shares of its gradient over the group, so every rank holds the whole sequence's.
    _close(layer.bias.grad, ref_b.grad, "bias gradient")


def _embedding(r: Rank, sequence_parallel: bool) -> None:
    """Lookup in a table split by vocabulary rows; repeated ids accumulate their gradients."""
    table = _random(21, VOCAB, HIDDEN)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(22))
    ids[0, :5] = torch.tensor([0, VOCAB - 1, VOCAB // 2, 0, VOCAB // 4 + 1])  # every shard's edges, a repeat
    upstream = _random(23, BATCH, SEQ, HIDDEN)

    ref_table = _leaf(table)
    ref_out = F.embedding(ids, ref_table)  # (B, T, H)
    (ref_out * upstream).sum().backward()

    layer = VocabParallelEmbedding(VOCAB, HIDDEN, r.group, init_method=_copying(table))
    out, expected = layer(ids), ref_out.detach()  # (B, T, H), replicated
    if sequence_parallel:
        out, expected, upstream = scatter_to_sequence(out, r.group), expected[:, r.own], upstream[:, r.own]
    (out * upstream).sum().backward()

    _close(out, expected, "output")
    _close(layer.weight.grad, r.shard(ref_table.grad, 0), "table gradient shard")


def _lm_head_cross_entropy(
    r: Rank, sequence_parallel: bool, smoothing: float, ignore_index: int, reduction: str
) -> None:
    """A column-parallel output layer into vocab_parallel_cross_entropy, never gathering the logits,
    against F.cross_entropy of F.linear on the whole vocabulary."""
    weight, bias = _random(31, VOCAB, HIDDEN, scale=HIDDEN**-0.5), _random(32, VOCAB)
    h = _random(33, BATCH, SEQ, HIDDEN)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(34))
    target[0, 1] = target[1, SEQ - 1] = ignore_index

    ref_w, ref_b, ref_h = _leaf(weight), _leaf(bias), _leaf(h)
    ref_logits = F.linear(ref_h, ref_w, ref_b)  # (B, T, V)
    ref_loss = F.cross_entropy(
        ref_logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=ignore_index,
        label_smoothing=smoothing, reduction=reduction,
    )  # fmt: skip
    ref_loss.backward()

    layer = ColumnParallelLinear(HIDDEN, VOCAB, r.group, init_method=_copying(weight), sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.bias.copy_(r.shard(bias, 0))
    h_in = _leaf(h[:, r.own] if sequence_parallel else h)  # (B, T / tp, H) a slice of the sequence, or (B, T, H)
    expected_h_grad = ref_h.grad[:, r.own] if sequence_parallel else ref_h.grad
    logits = layer(h_in)  # (B, T, V / tp)
    loss = vocab_parallel_cross_entropy(
        logits, target, group=r.group, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction
    )
    loss.backward()

    _close(loss, ref_loss.detach(), "loss")
    _close(h_in.grad, expected_h_grad, "hidden-state gradient")
    _close(layer.weight.grad, r.shard(ref_w.grad, 0), "weight gradient shard")
    _close(layer.bias.grad, r.shard(ref_b.grad, 0), "bias gradient shard")


def _against_reference(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    r = Rank(state.tp_rank, world, state.tp_group)
    checks: dict[str, Callable[[], None]] = {}
    for sp in (False, True):
        tag = ", sequence parallel" if sp else ""
        checks[f"column{tag}"] = lambda sp=sp: _column(r, gather_output=False, stacked=1, sequence_parallel=sp)
        checks[f"column, stacked QKV{tag}"] = lambda sp=sp: _column(
            r, gather_output=False, stacked=3, sequence_parallel=sp
        )
        checks[f"row, input_is_parallel{tag}"] = lambda sp=sp: _row(r, input_is_parallel=True, sequence_parallel=sp)
        checks[f"embedding{tag}"] = lambda sp=sp: _embedding(r, sequence_parallel=sp)
        for smoothing, ignore_index, reduction in ((0.0, -100, "mean"), (0.1, -1, "sum"), (0.2, 5, "mean")):
            checks[f"lm head + cross entropy, smoothing {smoothing}, ignore {ignore_index}, {reduction}{tag}"] = (
                lambda sp=sp, s=smoothing, i=ignore_index, red=reduction: _lm_head_cross_entropy(r, sp, s, i, red)
            )
    checks["column, gather_output"] = lambda: _column(r, gather_output=True, stacked=1, sequence_parallel=False)
    checks["row, replicated input"] = lambda: _row(r, input_is_parallel=False, sequence_parallel=False)
    assert len(checks) == 16
    _run_checks(checks, rank)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_layers_match_single_process_reference(tmp_path, tp: int) -> None:
    """Column (plain, gathered, stacked Q/K/V), row (parallel and replicated input), vocab-parallel
    embedding, and a column-parallel LM head into vocab_parallel_cross_entropy (ignore_index, label
    smoothing), with and without sequence parallelism: outputs, input and weight gradients."""
    run_distributed(_against_reference, tp, tmp_path)


# --------------------------------------------------------------------------------------------
# Against fairscale's model-parallel layers on the same weights


def _fairscale_column(r: Rank, gather_output: bool, stride: int) -> None:
    from fairscale.nn.model_parallel import layers as fs_layers

    out = 3 * HIDDEN if stride == 3 else FFN
    weight, x = _random(41, out, HIDDEN, scale=HIDDEN**-0.5), _random(42, BATCH, SEQ, HIDDEN)
    upstream = _random(43, BATCH, SEQ, out)
    use_bias = stride == 1  # fairscale's bias ignores the stride: compare strided weights without one
    ours = ColumnParallelLinear(
        HIDDEN, out, r.group, bias=use_bias, gather_output=gather_output,
        init_method=_copying(*weight.chunk(stride)), stacked=stride,
    )  # fmt: skip
    theirs = fs_layers.ColumnParallelLinear(
        HIDDEN, out, bias=use_bias, gather_output=gather_output, init_method=_copying(weight), stride=stride
    )
    if use_bias:
        bias = r.shard(_random(44, out), 0)
        with torch.no_grad():
            ours.bias.copy_(bias)
            theirs.bias.copy_(bias)
    _close(ours.weight, theirs.weight, "weight shard")
    results = []
    for layer in (ours, theirs):
        x_in = _leaf(x)
        y = layer(x_in)
        (y * (upstream if gather_output else r.shard(upstream, -1, stride))).sum().backward()
        results.append((y, x_in.grad, layer.weight.grad, layer.bias.grad if use_bias else None))
    for what, mine, fs in zip(("output", "input gradient", "weight gradient", "bias gradient"), *results):
        if fs is not None:
            _close(mine, fs, what)


def _fairscale_row(r: Rank, input_is_parallel: bool) -> None:
    from fairscale.nn.model_parallel import layers as fs_layers

    weight, bias = _random(51, HIDDEN, FFN, scale=FFN**-0.5), _random(52, HIDDEN)
    h, upstream = _random(53, BATCH, SEQ, FFN), _random(54, BATCH, SEQ, HIDDEN)
    ours = RowParallelLinear(FFN, HIDDEN, r.group, input_is_parallel=input_is_parallel, init_method=_copying(weight))
    theirs = fs_layers.RowParallelLinear(FFN, HIDDEN, input_is_parallel=input_is_parallel, init_method=_copying(weight))
    with torch.no_grad():
        ours.bias.copy_(bias)
        theirs.bias.copy_(bias)
    results = []
    for layer in (ours, theirs):
        h_in = _leaf(r.shard(h, -1) if input_is_parallel else h)
        y = layer(h_in)
        (y * upstream).sum().backward()
        results.append((y, h_in.grad, layer.weight.grad, layer.bias.grad))
    for what, mine, fs in zip(("output", "input gradient", "weight gradient", "bias gradient"), *results):
        _close(mine, fs, what)


def _fairscale_embedding(r: Rank) -> None:
    from fairscale.nn.model_parallel import layers as fs_layers

    table = _random(61, VOCAB, HIDDEN)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(62))
    upstream = _random(63, BATCH, SEQ, HIDDEN)
    ours = VocabParallelEmbedding(VOCAB, HIDDEN, r.group, init_method=_copying(table))
    theirs = fs_layers.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=_copying(table))
    results = []
    for layer in (ours, theirs):
        out = layer(ids)
        (out * upstream).sum().backward()
        results.append((out, layer.weight.grad))
    for what, mine, fs in zip(("output", "table gradient"), *results):
        _close(mine, fs, what)


def _fairscale_cross_entropy(r: Rank) -> None:
    """fairscale's has no ignore_index or label smoothing: the plain per-position loss."""
    from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy as fs_cross_entropy

    logits = r.shard(_random(71, BATCH, SEQ, VOCAB, scale=3.0), -1)  # (B, T, V / tp)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(72))
    weights = _random(73, BATCH, SEQ).abs()  # a non-uniform upstream gradient
    ours_in, theirs_in = _leaf(logits), _leaf(logits)
    ours = vocab_parallel_cross_entropy(ours_in, target, group=r.group, reduction="none")
    theirs = fs_cross_entropy(theirs_in.clone(), target)  # it shifts its input in place
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    _close(ours, theirs, "per-position loss")
    _close(ours_in.grad, theirs_in.grad, "logits gradient shard")


def _against_fairscale(rank: int, world: int) -> None:
    from fairscale.nn.model_parallel import initialize as fs_initialize

    fs_initialize.initialize_model_parallel(world)
    state = ParallelState.initialize(tensor_parallel=world)
    r = Rank(state.tp_rank, world, state.tp_group)
    checks: dict[str, Callable[[], None]] = {
        "column": lambda: _fairscale_column(r, gather_output=False, stride=1),
        "column, gather_output": lambda: _fairscale_column(r, gather_output=True, stride=1),
        "column, stacked QKV (fairscale stride 3)": lambda: _fairscale_column(r, gather_output=False, stride=3),
        "row, input_is_parallel": lambda: _fairscale_row(r, input_is_parallel=True),
        "row, replicated input": lambda: _fairscale_row(r, input_is_parallel=False),
        "embedding": lambda: _fairscale_embedding(r),
        "cross entropy": lambda: _fairscale_cross_entropy(r),
    }
    _run_checks(checks, rank)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_layers_match_fairscale(tmp_path, tp: int) -> None:
    """Our layers and cross entropy against fairscale 0.4.13's on the same full weights: outputs,
    input gradients and weight-gradient shards (fairscale slices the weights itself)."""
    run_distributed(_against_fairscale, tp, tmp_path)
