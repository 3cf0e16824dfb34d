"""Tensor-parallel communication, counted, against Megatron's analysis (gloo, CPU).

One ``megamm.model.blocks.TransformerBlock`` forward + backward under ``CommCounter`` runs exactly the
all-reduces ``predicted_block_comm`` names, in order, with the predicted bytes; the same block's
weights in Megatron's sequence-parallel form run the predicted all-gathers and reduce-scatters, where
``megamm.parallel.mappings`` runs each reduce-scatter on gloo as an all-reduce of the same full
tensor (``as_run``). The counter itself is checked on each collective it wraps, against byte counts
written out by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F

from megamm.model.blocks import TransformerBlock
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState, gather_from_sequence, reduce_scatter_to_sequence
from megamm.parallel.comm_counter import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    CommCounter,
    as_run,
    predicted_block_comm,
)
from megamm.parallel.mappings import ProcessGroup
from tests.distributed import run_distributed

BATCH, SEQ, HIDDEN, HEADS, FFN = 2, 8, 16, 4, 32


def _counter_records_each_collective(rank: int, world: int) -> None:
    """Each wrapped function, called directly: kind, function, group size and payload bytes."""
    state = ParallelState.initialize(tensor_parallel=world)
    original = dist.all_reduce
    t = torch.ones(3, 5)  # 60 bytes
    expected = [  # (kind, op, group size, payload bytes): the full tensor each call operates on
        ("all_reduce", "all_reduce", world, 60),
        ("all_reduce", "all_reduce", world, 15 * 8),  # float64 on the tensor-parallel group
        ("all_gather", "all_gather", world, world * 60),
        ("all_gather", "all_gather_into_tensor", world, world * 60),
        ("all_gather", "_all_gather_base", world, world * 60),
        ("broadcast", "broadcast", world, 60),
        ("reduce_scatter", "reduce_scatter", world, world * 60),
        ("reduce_scatter", "reduce_scatter_tensor", world, world * 60),
    ]
    with warnings.catch_warnings(), CommCounter() as counter:
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated names are still wrapped
        assert dist.all_reduce is not original and c10d.all_reduce is dist.all_reduce
        dist.all_reduce(t)
        dist.all_reduce(torch.ones(15, dtype=torch.float64), group=state.tp_group)
        dist.all_gather([torch.empty(3, 5) for _ in range(world)], t)
        dist.all_gather_into_tensor(torch.empty(world * 3, 5), t)  # calls all_gather_single inside: one record
        dist._all_gather_base(torch.empty(world * 3, 5), t)
        dist.broadcast(t, src=0)
        dist.reduce_scatter(torch.empty(3, 5), [torch.ones(3, 5) for _ in range(world)])
        dist.reduce_scatter_tensor(torch.empty(3, 5), torch.ones(world * 3, 5))
        with CommCounter() as inner:  # nested: both record
            dist.all_reduce(torch.ones(2))
        if world > 1 and rank < 2:
            if rank == 0:
                dist.send(torch.ones(7), dst=1)
            else:
                dist.recv(torch.empty(7), src=0)
            expected.append(("send" if rank == 0 else "recv", "send" if rank == 0 else "recv", world, 28))
    assert dist.all_reduce is original and c10d.all_reduce is original, "the functions were not restored"
    expected.insert(8, ("all_reduce", "all_reduce", world, 8))
    assert [(c.kind, c.op, c.group_size, c.payload_bytes) for c in counter.records] == expected
    assert [(c.kind, c.payload_bytes) for c in inner.records] == [("all_reduce", 8)]
    assert counter.records[1].dtype == "float64" and counter.records[0].dtype == "float32"
    summary = counter.summary()
    assert summary["all_gather"]["count"] == 3 and summary["all_gather"]["payload_bytes"] == 3 * world * 60
    assert summary["total"]["payload_bytes"] == counter.payload_bytes == sum(e[3] for e in expected)
    if world > 1:  # the ring model: an all-reduce sends 2 (p - 1) / p of its payload, an all-gather half that
        assert summary["all_reduce"]["ring_bytes"] == pytest.approx(2 * (world - 1) / world * (60 + 120 + 8))
        assert counter.records[2].ring_bytes == pytest.approx((world - 1) / world * world * 60)
    dist.all_reduce(t)  # after the block: not counted
    assert len(counter.records) == len(expected)


def _sequence_parallel_block(block: TransformerBlock, x_local: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``block``'s own weight shards in Megatron's sequence-parallel form: (B, T / tp, H) -> (B, T / tp, H).

    Norms and residuals on this rank's slice of the sequence; an all-gather of the sequence into each
    column-parallel projection, a reduce-scatter out of each row-parallel one (its bias added after).
    """
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


def _block_comm(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    group = state.tp_group
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        block = TransformerBlock(HIDDEN, HEADS, FFN, group, WeightInit(), num_layers=2).to(dtype)
        x = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(1))
        upstream = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, generator=torch.Generator().manual_seed(2))
        size = x.element_size()

        # Tensor parallel: 2 all-reduces forward (g), 2 backward (f), each of the (B, T, H) activations.
        x_in = x.clone().requires_grad_()
        with CommCounter() as counter:
            out = block(x_in)
            forward_calls = len(counter.records)
            (out * upstream).sum().backward()
        predicted = predicted_block_comm(BATCH, SEQ, HIDDEN, world, sequence_parallel=False, bytes_per_element=size)
        assert [c.kind for c in predicted.collectives] == [ALL_REDUCE] * 4
        assert predicted.payload_bytes == 4 * BATCH * SEQ * HIDDEN * size
        assert [c.signature() for c in counter.records] == [c.signature() for c in predicted.collectives], dtype
        assert forward_calls == len(predicted.forward) == 2
        assert counter.summary() == predicted.summary()
        assert {c.dtype for c in counter.records} == {str(dtype).removeprefix("torch.")}

        # Sequence parallel, the same weights: 2 all-gathers + 2 reduce-scatters forward, mirrored backward.
        own = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
        x_local = x[:, own].clone().requires_grad_()
        with CommCounter() as sp_counter:
            sp_out = _sequence_parallel_block(block, x_local, group)
            sp_forward_calls = len(sp_counter.records)
            (sp_out * upstream[:, own]).sum().backward()
        torch.testing.assert_close(sp_out, out.detach()[:, own])  # it is the same block
        torch.testing.assert_close(x_local.grad, x_in.grad[:, own])
        sp = predicted_block_comm(BATCH, SEQ, HIDDEN, world, sequence_parallel=True, bytes_per_element=size)
        logical = [ALL_GATHER, REDUCE_SCATTER] * 4
        assert [c.kind for c in sp.collectives] == logical
        assert sp.ring_bytes == pytest.approx(predicted.ring_bytes)  # Megatron: no more communication than TP
        # gloo: megamm's mappings run each reduce-scatter as an all-reduce of the same full tensor.
        backend = dist.get_backend(group)
        assert backend == "gloo"
        ran = as_run(sp.collectives, backend)
        assert [c.kind for c in ran] == [ALL_GATHER, ALL_REDUCE] * 4
        assert [c.signature() for c in sp_counter.records] == [c.signature() for c in ran], dtype
        assert sp_forward_calls == len(sp.forward) == 4
        assert sp_counter.payload_bytes == sp.payload_bytes == 8 * BATCH * SEQ * HIDDEN * size


@pytest.mark.parametrize("tp", [2, 4])
def test_comm_counter_records_each_collective(tmp_path, tp: int) -> None:
    run_distributed(_counter_records_each_collective, tp, tmp_path)


@pytest.mark.parametrize("tp", [2, 4])
def test_transformer_block_communicates_as_predicted(tmp_path, tp: int) -> None:
    """TransformerBlock forward + backward: the predicted all-reduces, in order, with their bytes; in
    sequence-parallel form, the predicted all-gathers and (as gloo runs them) reduce-scatters."""
    run_distributed(_block_comm, tp, tmp_path)


def test_predicted_block_comm_is_megatrons_analysis() -> None:
    """Numbers from the analysis itself: 4 all-reduces of B*T*H elements, or 4 all-gathers and 4
    reduce-scatters with the same ring bytes; nothing at tp=1."""
    tp_only = predicted_block_comm(4, 512, 1024, 8, sequence_parallel=False, bytes_per_element=2)
    activations = 4 * 512 * 1024 * 2  # bytes of one (B, T, H) bf16 activation
    ring = 4 * 2 * 7 / 8 * activations  # 4 all-reduces, each sending 2 (p - 1) / p of it
    assert tp_only.summary()["all_reduce"] == {"count": 4, "payload_bytes": 4 * activations, "ring_bytes": ring}
    assert [c.phase for c in tp_only.collectives] == ["forward", "forward", "backward", "backward"]
    sp = predicted_block_comm(4, 512, 1024, 8, sequence_parallel=True, bytes_per_element=2)
    assert sp.summary()["all_gather"]["count"] == sp.summary()["reduce_scatter"]["count"] == 4
    assert sp.ring_bytes == tp_only.ring_bytes == 7 * activations
    assert predicted_block_comm(4, 512, 1024, 1, sequence_parallel=True, bytes_per_element=2).collectives == ()
    with pytest.raises(ValueError, match="divisible"):
        predicted_block_comm(1, 10, 8, 4, sequence_parallel=True, bytes_per_element=4)
