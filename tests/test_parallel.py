"""Tensor/data-parallel building blocks against single-process references (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megamm.config import load_config
from megamm.model import MultiModalTransformer
from megamm.model.heads import contrastive_loss
from megamm.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
    shard_of,
    vocab_parallel_cross_entropy,
)
from megamm.parallel import layout
from megamm.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed
from tests.distributed import run_distributed

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# Layout against DeepSpeed's own topology


def _grids(max_world: int) -> list[tuple[int, int, int]]:
    """Every (world, tp, pp) with world in 1..max_world and tp * pp dividing world."""
    return [
        (world, tp, pp)
        for world in range(1, max_world + 1)
        for tp in range(1, world + 1)
        for pp in range(1, world // tp + 1)
        if world % (tp * pp) == 0
    ]


def test_layout_matches_deepspeed_topology_for_every_grid_up_to_16_ranks() -> None:
    """For every world size 1..16 and every (tp, pp) dividing it: each rank's coordinates, the
    tensor-, data-, pipeline- and model-parallel groups (ranks and their order) and the mpu's
    model-parallel rank equal DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model)."""
    grids = _grids(16)
    # 110 = the sum over world sizes of d3(world), the number of ordered (tp, pp, dp) with product world
    assert len(grids) == 110 and (16, 4, 2) in grids and (7, 7, 1) in grids
    for world, tp, pp in grids:
        dp = world // (tp * pp)
        where = f"world={world} tp={tp} pp={pp}"
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        assert topo.world_size() == world, where
        for rank in range(world):
            coords = layout.rank_to_coords(rank, world, tp, pp)
            ref = topo.get_coord(rank)
            assert (coords.pp, coords.dp, coords.tp) == (ref.pipe, ref.data, ref.model), f"{where} rank={rank}"
            assert layout.coords_to_rank(coords, world, tp, pp) == rank, f"{where} rank={rank}"
            assert topo.get_rank(pipe=coords.pp, data=coords.dp, model=coords.tp) == rank, f"{where} rank={rank}"
        model_parallel = [topo.filter_match(data=d) for d in range(dp)]  # ranks sharing a data coordinate
        for what, ours, theirs in (
            ("tensor", layout.tensor_parallel_groups(world, tp, pp), topo.get_axis_comm_lists("model")),
            ("data", layout.data_parallel_groups(world, tp, pp), topo.get_axis_comm_lists("data")),
            ("pipeline", layout.pipeline_parallel_groups(world, tp, pp), topo.get_axis_comm_lists("pipe")),
            ("model", layout.model_parallel_groups(world, tp, pp), model_parallel),
        ):
            assert ours == theirs, f"{where}: {what}-parallel groups {ours} != DeepSpeed's {theirs}"
        # DeepSpeed's mpu contract: a rank's model-parallel rank is its index in its model-parallel group.
        for rank in range(world):
            coords = layout.rank_to_coords(rank, world, tp, pp)
            state = ParallelState(world, rank, tp, pp, dp, coords.tp, coords.pp, coords.dp)
            assert model_parallel[coords.dp].index(rank) == state.get_model_parallel_rank(), f"{where} rank={rank}"
            assert state.get_model_parallel_world_size() == len(model_parallel[coords.dp]), where


def test_layout_rejects_indivisible_world() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        layout.rank_to_coords(0, 6, tp=4)


# --------------------------------------------------------------------------------------------
# Column -> Row MLP, TP=2 vs the TP=1 reference


def _mlp_parity(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    hidden, ffn = 8, 16

    def build(group):
        torch.manual_seed(7)
        return ColumnParallelLinear(hidden, ffn, group), RowParallelLinear(ffn, hidden, group)

    ref_up, ref_down = build(None)
    up, down = build(state.tp_group)
    torch.manual_seed(11)
    x = torch.randn(3, 5, hidden)
    target = torch.randn(3, 5, hidden)

    x_ref = x.clone().requires_grad_(True)
    ref_out = ref_down(F.gelu(ref_up(x_ref)))
    F.mse_loss(ref_out, target).backward()

    x_tp = x.clone().requires_grad_(True)
    out = down(F.gelu(up(x_tp)))
    F.mse_loss(out, target).backward()

    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_tp.grad, x_ref.grad, atol=ATOL, rtol=0)
    rows = ffn // world
    sl = slice(state.tp_rank * rows, (state.tp_rank + 1) * rows)
    torch.testing.assert_close(up.weight.grad, ref_up.weight.grad[sl], atol=ATOL, rtol=0)
    torch.testing.assert_close(up.bias.grad, ref_up.bias.grad[sl], atol=ATOL, rtol=0)
    torch.testing.assert_close(down.weight.grad, ref_down.weight.grad[:, sl], atol=ATOL, rtol=0)
    torch.testing.assert_close(down.bias.grad, ref_down.bias.grad, atol=ATOL, rtol=0)
    assert up.weight.tensor_model_parallel and not hasattr(down.bias, "tensor_model_parallel")


def test_column_row_mlp_tp2_matches_single_process(tmp_path) -> None:
    run_distributed(_mlp_parity, 2, tmp_path)


def _embedding_parity(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    torch.manual_seed(3)
    ref = VocabParallelEmbedding(16, 4, None)
    torch.manual_seed(3)
    emb = VocabParallelEmbedding(16, 4, state.tp_group)
    ids = torch.tensor([[0, 5, 8, 15], [9, 7, 1, 12]])
    out, ref_out = emb(ids), ref(ids)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad.chunk(world)[state.tp_rank], atol=ATOL, rtol=0)
    # An id outside the vocabulary fails alike at TP=1 and TP=2 (it used to become a zero vector at TP=2).
    for bad in (16, -1):
        for layer in (ref, emb):
            with pytest.raises(RuntimeError, match=r"token ids must be in \[0, 16\)"):
                layer(torch.tensor([[0, bad]]))


def test_vocab_parallel_embedding_tp2_matches_single_process(tmp_path) -> None:
    run_distributed(_embedding_parity, 2, tmp_path)


def _cross_entropy_parity(rank: int, world: int) -> None:
    """vocab_parallel_cross_entropy on this rank's vocabulary slice against F.cross_entropy on the
    full logits: loss and the logits' gradient, with ignored positions, label smoothing, every
    reduction, and logits large enough to overflow exp() without the max subtraction."""
    state = ParallelState.initialize(tensor_parallel=world)
    vocab = 24
    for case, (scale, smoothing, reduction) in enumerate(
        [(1.0, 0.0, "mean"), (3.0, 0.1, "mean"), (1.0, 0.2, "sum"), (1.0, 0.0, "none"), (500.0, 0.05, "mean")]
    ):
        torch.manual_seed(case)
        full = (scale * torch.randn(2, 5, vocab, dtype=torch.float64)).requires_grad_()  # (B, T, V)
        target = torch.randint(0, vocab, (2, 5))
        target[0, 1] = target[1, 4] = -100  # ignored positions
        shard = full.detach().chunk(world, dim=-1)[state.tp_rank].clone().requires_grad_()  # (B, T, V / tp)
        loss = vocab_parallel_cross_entropy(
            shard, target, group=state.tp_group, label_smoothing=smoothing, reduction=reduction
        )
        expected = F.cross_entropy(
            full.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, label_smoothing=smoothing, reduction=reduction
        )
        expected = expected.reshape(target.shape) if reduction == "none" else expected
        torch.testing.assert_close(loss, expected, atol=1e-10, rtol=1e-10, msg=f"case {case}: loss")
        weights = torch.rand(loss.shape, dtype=torch.float64)  # a non-uniform upstream gradient
        (loss * weights).sum().backward()
        (expected * weights).sum().backward()
        own = full.grad.chunk(world, dim=-1)[state.tp_rank]
        torch.testing.assert_close(shard.grad, own, atol=1e-10, rtol=1e-10, msg=f"case {case}: gradient")
        assert torch.all(shard.grad[0, 1] == 0) and torch.all(shard.grad[1, 4] == 0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_cross_entropy_matches_f_cross_entropy(tmp_path, tp: int) -> None:
    run_distributed(_cross_entropy_parity, tp, tmp_path)


def _sequence_parallel_parity(rank: int, world: int) -> None:
    """A Megatron sequence-parallel MLP block (norm on sequence slices, all-gather into the
    column-parallel matmul, reduce-scatter out of the row-parallel one) against one process:
    outputs, the input's gradient, per-shard weight gradients and the replicated norm's
    gradient, once summed over the group."""
    state = ParallelState.initialize(tensor_parallel=world)
    group = state.tp_group
    torch.manual_seed(0)
    batch, seq, hidden, ffn = 2, 8, 6, 12
    x = torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(ffn, hidden, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(hidden, ffn, dtype=torch.float64, requires_grad=True)
    norm = torch.nn.LayerNorm(hidden, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    upstream = torch.randn(batch, seq, hidden, dtype=torch.float64)
    out = x + F.gelu(norm(x) @ w1.T) @ w2.T  # (B, T, H)
    (out * upstream).sum().backward()

    own = slice(rank * seq // world, (rank + 1) * seq // world)
    x_local = x.detach()[:, own].clone().requires_grad_()  # (B, T / tp, H): this rank's slice
    w1_local = w1.detach().chunk(world, dim=0)[rank].clone().requires_grad_()  # column-parallel
    w2_local = w2.detach().chunk(world, dim=1)[rank].clone().requires_grad_()  # row-parallel
    norm_local = torch.nn.LayerNorm(hidden, dtype=torch.float64)
    norm_local.load_state_dict(norm.state_dict())
    hidden_states = gather_from_sequence(norm_local(x_local), group)  # (B, T, H)
    partial = F.gelu(hidden_states @ w1_local.T) @ w2_local.T  # (B, T, H), this rank's share of the sum
    out_local = x_local + reduce_scatter_to_sequence(partial, group)  # (B, T / tp, H)
    (out_local * upstream[:, own]).sum().backward()

    torch.testing.assert_close(out_local, out.detach()[:, own], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x_local.grad, x.grad[:, own], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w1_local.grad, w1.grad.chunk(world, dim=0)[rank], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w2_local.grad, w2.grad.chunk(world, dim=1)[rank], atol=1e-10, rtol=1e-10)
    # The norm's weights are replicated but each rank saw only its slice of the sequence: the
    # full gradient is the sum over the group (what sequence parallelism must all-reduce).
    for local, full in ((norm_local.weight, norm.weight), (norm_local.bias, norm.bias)):
        summed = local.grad.clone()
        if world > 1:
            dist.all_reduce(summed, group=group)
        torch.testing.assert_close(summed, full.grad, atol=1e-10, rtol=1e-10)
        if world > 1:
            assert not torch.allclose(local.grad, full.grad), "a slice's norm gradient already equals the whole"

    # Entering sequence parallelism from a replicated tensor: each rank keeps its slice, and the
    # gradient is every rank's slice gradient, gathered.
    replicated = x.detach().clone().requires_grad_()
    piece = scatter_to_sequence(replicated, group)
    torch.testing.assert_close(piece, x.detach()[:, own])
    (piece * upstream[:, own]).sum().backward()
    torch.testing.assert_close(replicated.grad, upstream)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sequence_parallel_mappings_match_single_process(tmp_path, tp: int) -> None:
    run_distributed(_sequence_parallel_parity, tp, tmp_path)


def test_vocab_parallel_cross_entropy_refuses_bad_arguments() -> None:
    group = None  # not reached: the arguments are checked first
    logits, target = torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        vocab_parallel_cross_entropy(logits, target, group=group, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be"):
        vocab_parallel_cross_entropy(logits, target, group=group, reduction="avg")
    with pytest.raises(ValueError, match="do not match"):
        vocab_parallel_cross_entropy(logits, target[:, :2], group=group)


# --------------------------------------------------------------------------------------------
# Contrastive loss over the data-parallel group vs the naive global loss


def _naive_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    logits = scale * images @ texts.T
    labels = torch.arange(images.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _contrastive_parity(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=1)
    torch.manual_seed(5)
    global_images, global_texts = torch.randn(world * 4, 6), torch.randn(world * 4, 6)

    ref_images = global_images.clone().requires_grad_(True)
    ref_texts = global_texts.clone().requires_grad_(True)
    ref_loss = _naive_clip_loss(ref_images, ref_texts, 10.0)
    ref_loss.backward()

    rows = slice(rank * 4, (rank + 1) * 4)
    images = global_images[rows].clone().requires_grad_(True)
    texts = global_texts[rows].clone().requires_grad_(True)
    loss = contrastive_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), torch.tensor(10.0), state.dp_group)
    loss.backward()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, ref_loss.detach(), atol=ATOL, rtol=0)
    # Data-parallel training averages gradients over ranks: (1/dp) * local grad == global grad.
    torch.testing.assert_close(images.grad / world, ref_images.grad[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(texts.grad / world, ref_texts.grad[rows], atol=ATOL, rtol=0)


def test_contrastive_loss_dp2_matches_global_loss(tmp_path) -> None:
    run_distributed(_contrastive_parity, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# The whole model, TP=2 vs TP=1


def _model_parity(rank: int, world: int) -> None:
    config = load_config("clip_tiny", ["parallel.tensor_parallel=2"]).model
    state = ParallelState.initialize(tensor_parallel=world)
    torch.manual_seed(1)
    reference = MultiModalTransformer(config, ParallelState.single())
    torch.manual_seed(1)
    model = MultiModalTransformer(config, state)
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(4, 3, config.image.image_size, config.image.image_size, generator=generator)
    ids = torch.randint(0, config.text.vocab_size, (4, config.text.max_length), generator=generator)
    mask = torch.arange(config.text.max_length)[None, :] < torch.tensor([[5], [9], [3], [12]])

    ref_loss = reference(image, ids, mask)["loss"]
    loss = model(image, ids, mask)["loss"]
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad
        if getattr(param, "tensor_model_parallel", False):
            ref_grad = shard_of(ref_grad, state.tp_rank, world, param.partition_dim, param.partition_stride)
        torch.testing.assert_close(param.grad, ref_grad, atol=ATOL, rtol=1e-4, msg=name)


def test_multimodal_model_tp2_matches_single_process(tmp_path) -> None:
    run_distributed(_model_parity, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# An independent implementation as oracle: fairscale's Megatron-style model-parallel layers


def _fairscale_parity(rank: int, world: int) -> None:
    from fairscale.nn.model_parallel import initialize as fs_initialize
    from fairscale.nn.model_parallel import layers as fs_layers

    fs_initialize.initialize_model_parallel(world)
    state = ParallelState.initialize(tensor_parallel=world)
    hidden, ffn = 8, 12

    def build(column_cls, row_cls, **group):
        torch.manual_seed(21)
        init = lambda weight: torch.nn.init.normal_(weight, std=0.3)  # noqa: E731
        return column_cls(hidden, ffn, init_method=init, **group), row_cls(ffn, hidden, init_method=init, **group)

    fs_up, fs_down = build(fs_layers.ColumnParallelLinear, fs_layers.RowParallelLinear)
    up, down = build(ColumnParallelLinear, RowParallelLinear, group=state.tp_group)
    torch.manual_seed(4)
    x = torch.randn(6, hidden)
    outputs = []
    for first, second in ((fs_up, fs_down), (up, down)):
        inp = x.clone().requires_grad_(True)
        out = second(torch.tanh(first(inp)))
        out.pow(2).sum().backward()
        outputs.append((out, inp.grad, first.weight.grad, second.weight.grad, first.bias.grad))
    for ours, theirs in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_column_row_tp2_match_fairscale(tmp_path) -> None:
    run_distributed(_fairscale_parity, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# Attention against torch's own multi-head attention


def test_self_attention_matches_torch_multihead_attention() -> None:
    """The stacked Q/K/V projection is torch's in_proj: same weights, same outputs and gradients."""
    from megamm.model.attention import ParallelSelfAttention
    from megamm.parallel import normal_init

    torch.manual_seed(0)
    ours = ParallelSelfAttention(16, 4, None, init_method=normal_init(0.3), output_init_method=normal_init(0.3))
    with torch.no_grad():
        ours.qkv.bias.normal_()
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.out.weight)
        reference.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(3, 7, 16)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4], [2]])  # True = real token
    out = ours(x, mask)
    ref_out, _ = reference(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    ref_out.pow(2).sum().backward()
    torch.testing.assert_close(ours.qkv.weight.grad, reference.in_proj_weight.grad, atol=1e-4, rtol=1e-4)


def test_stacked_shards_hold_whole_blocks() -> None:
    full = torch.arange(12.0).reshape(12, 1)  # blocks Q = 0..3, K = 4..7, V = 8..11
    assert shard_of(full, 1, 2, dim=0, stride=3).flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_of(full, 0, 2, dim=0).flatten().tolist() == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------------
# Tensor-parallel random streams and activation checkpointing


def _rng_streams(rank: int, world: int) -> None:
    """Dropout agrees across a tensor-parallel group outside forked regions and differs inside,
    with Megatron's seeds (seed, and seed + 2718 + tp_rank)."""
    state = ParallelState.initialize(tensor_parallel=world)
    model_parallel_seed(123, state.tp_rank)
    shared = F.dropout(torch.ones(256), 0.5)
    with get_rng_tracker().fork():
        own = F.dropout(torch.ones(256), 0.5)
    after = torch.rand(4)  # the default stream continues as if the fork had not happened
    everyone = [torch.empty(256) for _ in range(world)]
    dist.all_gather(everyone, shared, group=state.tp_group)
    assert all(torch.equal(mask, shared) for mask in everyone)
    dist.all_gather(everyone, own, group=state.tp_group)
    assert not any(torch.equal(mask, own) for index, mask in enumerate(everyone) if index != state.tp_rank)

    torch.manual_seed(123)
    assert torch.equal(F.dropout(torch.ones(256), 0.5), shared)
    assert torch.equal(torch.rand(4), after)
    torch.manual_seed(123 + 2718 + state.tp_rank)
    assert torch.equal(F.dropout(torch.ones(256), 0.5), own)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_rng_streams_differ_inside_regions_and_agree_outside(tmp_path, tp: int) -> None:
    run_distributed(_rng_streams, tp, tmp_path)


class _DropoutBlock(torch.nn.Module):
    """Dropout from both streams between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.up(x), 0.3)  # the default stream
        with get_rng_tracker().fork():
            h = F.dropout(F.gelu(h), 0.3)  # the tensor-parallel stream
        return self.down(h)


def _run_block(wrap) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    block, x = _DropoutBlock(), torch.randn(4, 8, requires_grad=True)
    model_parallel_seed(7, tp_rank=0)
    out = wrap(block, x) + wrap(block, x)  # twice: the second call draws new masks
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), grads, x.grad.clone(), torch.rand(3)


def test_checkpoint_replays_both_random_streams() -> None:
    out, grads, x_grad, next_draw = _run_block(lambda block, x: block(x))
    ckpt_out, ckpt_grads, ckpt_x_grad, ckpt_next_draw = _run_block(checkpoint)
    torch.testing.assert_close(ckpt_out, out, atol=0, rtol=0)
    torch.testing.assert_close(ckpt_x_grad, x_grad, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=0, rtol=0, msg=name)
    assert torch.equal(ckpt_next_draw, next_draw), "checkpointing changed the random stream after it"
    # torch's own checkpoint replays the default stream only: the forked masks differ on recompute.
    import torch.utils.checkpoint as torch_checkpoint

    _, naive_grads, _, _ = _run_block(lambda block, x: torch_checkpoint.checkpoint(block, x, use_reentrant=False))
    assert not torch.allclose(naive_grads["up.weight"], grads["up.weight"])


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients() -> None:
    """The model with activation checkpointing runs every block twice per training step (forward,
    then recompute) and gives the same loss and gradients; evaluation runs each block once."""
    config = load_config("clip_tiny").model
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 200, (4, 24)), torch.ones(4, 24, dtype=torch.bool))
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = MultiModalTransformer(config)
        model.set_activation_checkpointing(enabled)
        calls = []
        for block in model.modules():
            if type(block).__name__ == "TransformerBlock":
                block.register_forward_hook(lambda *_: calls.append(1))
        loss = model(*batch)["loss"]
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        train_calls = len(calls)
        model.eval()
        with torch.no_grad():
            model(*batch, compute_loss=False)
        results.append((loss.detach(), grads, train_calls, len(calls) - train_calls))
    (loss, grads, calls, eval_calls), (ckpt_loss, ckpt_grads, ckpt_calls, ckpt_eval_calls) = results
    blocks = config.text.num_layers + config.image.num_layers
    assert (calls, ckpt_calls, eval_calls, ckpt_eval_calls) == (blocks, 2 * blocks, blocks, blocks)
    torch.testing.assert_close(ckpt_loss, loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
