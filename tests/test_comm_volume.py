"""Tensor-parallel communication, counted, against Megatron's analysis (gloo, CPU).

One ``megamm.model.blocks.TransformerBlock`` forward + backward under ``CommCounter`` runs exactly the
all-reduces ``predicted_block_comm`` names, in order, with the predicted bytes; the same block with
``sequence_parallel=True`` runs the predicted all-gathers and reduce-scatters and the all-reduces of
its replicated parameters' gradients. The counter itself is checked on each collective it wraps,
against byte counts written out by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megamm.model.blocks import TransformerBlock
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState
from megamm.parallel.comm_counter import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    CommCounter,
    predicted_block_comm,
)
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

        # Sequence parallel, the same weights: 2 all-gathers + 2 reduce-scatters forward, mirrored
        # backward, and the all-reduces of the replicated parameters' gradients.
        sp_block = TransformerBlock(HIDDEN, HEADS, FFN, group, WeightInit(), num_layers=2, sequence_parallel=True)
        sp_block = sp_block.to(dtype)
        sp_block.load_state_dict(block.state_dict())
        own = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
        x_local = x[:, own].clone().requires_grad_()
        with CommCounter() as sp_counter:
            sp_out = sp_block(x_local)
            sp_forward_calls = len(sp_counter.records)
            (sp_out * upstream[:, own]).sum().backward()
        torch.testing.assert_close(sp_out, out.detach()[:, own])  # it is the same block
        torch.testing.assert_close(x_local.grad, x_in.grad[:, own])
        for name, param in sp_block.named_parameters():  # every gradient, replicated ones summed
            torch.testing.assert_close(param.grad, dict(block.named_parameters())[name].grad, msg=name)
        sp = predicted_block_comm(BATCH, SEQ, HIDDEN, world, sequence_parallel=True, bytes_per_element=size)
        assert [c.kind for c in sp.activations] == [ALL_GATHER, REDUCE_SCATTER] * 4
        replicated = {name for name, param in sp_block.named_parameters() if getattr(param, "sequence_parallel", False)}
        assert replicated == {name for c in sp.parameter_gradients for name in c.parameters}
        assert sp.summary()["all_reduce"] == {  # LayerNorm weight + bias (2H) and row bias (H), per sub-layer
            "count": 4, "payload_bytes": 6 * HIDDEN * size, "ring_bytes": 2 * (world - 1) / world * 6 * HIDDEN * size
        }
        # Megatron: the activations cost no more communication than without sequence parallelism.
        assert sum(c.ring_bytes for c in sp.activations) == pytest.approx(predicted.ring_bytes)
        assert dist.get_backend(group) == "gloo"  # which runs reduce-scatters as such
        assert [c.signature() for c in sp_counter.records] == [c.signature() for c in sp.collectives], dtype
        assert sp_forward_calls == len(sp.forward) == 4
        assert sp_counter.summary() == sp.summary()
        assert sp_counter.payload_bytes == sp.payload_bytes == (8 * BATCH * SEQ + 6) * HIDDEN * size


@pytest.mark.parametrize("tp", [2, 4])
def test_comm_counter_records_each_collective(tmp_path, tp: int) -> None:
    run_distributed(_counter_records_each_collective, tp, tmp_path)


@pytest.mark.parametrize("tp", [2, 4])
def test_transformer_block_communicates_as_predicted(tmp_path, tp: int) -> None:
    """TransformerBlock forward + backward: the predicted all-reduces, in order, with their bytes; with
    sequence parallelism, the predicted all-gathers and reduce-scatters and the replicated parameters'
    gradient all-reduces."""
    run_distributed(_block_comm, tp, tmp_path)


def test_predicted_block_comm_is_megatrons_analysis() -> None:
    """Numbers from the analysis itself: 4 all-reduces of B*T*H elements, or 4 all-gathers and 4
    reduce-scatters with the same ring bytes (plus 6 * H elements of replicated parameters'
    gradients, all-reduced); nothing at tp=1."""
    tp_only = predicted_block_comm(4, 512, 1024, 8, sequence_parallel=False, bytes_per_element=2)
    activations = 4 * 512 * 1024 * 2  # bytes of one (B, T, H) bf16 activation
    ring = 4 * 2 * 7 / 8 * activations  # 4 all-reduces, each sending 2 (p - 1) / p of it
    assert tp_only.summary()["all_reduce"] == {"count": 4, "payload_bytes": 4 * activations, "ring_bytes": ring}
    assert [c.phase for c in tp_only.collectives] == ["forward", "forward", "backward", "backward"]
    sp = predicted_block_comm(4, 512, 1024, 8, sequence_parallel=True, bytes_per_element=2)
    assert sp.summary()["all_gather"]["count"] == sp.summary()["reduce_scatter"]["count"] == 4
    assert sum(c.ring_bytes for c in sp.activations) == tp_only.ring_bytes == 7 * activations
    parameters = 6 * 1024 * 2  # 2 LayerNorms' weights and biases, 2 row-parallel biases (bf16)
    assert sp.ring_bytes == 7 * activations + 2 * 7 / 8 * parameters
    assert sorted(p for c in sp.parameter_gradients for p in c.parameters) == sorted(
        ["attn_norm.weight", "attn_norm.bias", "attn.out.bias", "mlp_norm.weight", "mlp_norm.bias", "mlp.down.bias"]
    )
    assert tp_only.parameter_gradients == ()
    assert predicted_block_comm(4, 512, 1024, 1, sequence_parallel=True, bytes_per_element=2).collectives == ()
    with pytest.raises(ValueError, match="divisible"):
        predicted_block_comm(1, 10, 8, 4, sequence_parallel=True, bytes_per_element=4)
