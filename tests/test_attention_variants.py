"""Attention kernels (full, local, block-sparse, linear), cross-attention and rotary positions against
naive O(T^2) references; causality, padding, and TP=2 against TP=1. Tiny shapes, float64."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from megamm.model.attention import (
    BlockSparseAttention,
    FullAttention,
    LinearAttention,
    LocalAttention,
    ParallelCrossAttention,
    ParallelSelfAttention,
    RotaryEmbedding,
    attention_kernel,
)
from megamm.parallel import ParallelState, normal_init, shard_of
from tests.distributed import run_distributed

F64 = dict(atol=1e-10, rtol=1e-10)


def _qkv(batch: int = 2, heads: int = 2, length: int = 13, dim: int = 8, seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)).requires_grad_()
        for _ in range(3)
    ]


def _lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (B, T): True = real


def _reference(q, k, v, allowed: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Naive softmax attention under an explicit (Tq, Tk) mask; rows without keys give zeros."""
    valid = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, h, Tq, Tk)
    return probs @ v


def _local_allowed(length: int, window: int, global_tokens: int, causal: bool) -> torch.Tensor:
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = ((i - j).abs() <= window) | (i < global_tokens) | (j < global_tokens)
    return allowed & (j <= i) if causal else allowed


def _block_allowed(length: int, block: int, neighbors: int, global_blocks: int, causal: bool) -> torch.Tensor:
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    bi, bj = i // block, j // block
    allowed = ((bi - bj).abs() <= neighbors) | (bi < global_blocks) | (bj < global_blocks)
    return allowed & (j <= i) if causal else allowed


def _assert_same_with_grads(out, expected, inputs, what: str) -> None:
    torch.testing.assert_close(out, expected, **F64, msg=f"{what}: output")
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    expected_grads = torch.autograd.grad(expected, inputs, upstream, retain_graph=True)
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got, want, **F64, msg=f"{what}: d{name}")


# ----------------------------------------------------------------------------------------------
# Sparse kernels


@pytest.mark.parametrize("causal", [False, True])
def test_wide_window_and_all_blocks_equal_full_attention(causal: bool) -> None:
    """A window covering the sequence (and block-sparse with every block a neighbour) is full
    attention, with and without key padding, global tokens or not; gradients too."""
    q, k, v = _qkv(length=13)
    full = FullAttention()
    for mask in (None, _lengths_mask([13, 6], 13)):
        expected = full(q, k, v, mask, causal=causal)
        for kernel in (
            LocalAttention(window=12, chunk_size=4),
            LocalAttention(window=50, global_tokens=2),
            BlockSparseAttention(block_size=4, num_neighbors=3),
            BlockSparseAttention(block_size=5, num_neighbors=1, num_global_blocks=1),  # 3 blocks: all seen
        ):
            what = f"{kernel!r} causal={causal} mask={mask is not None}"
            _assert_same_with_grads(kernel(q, k, v, mask, causal=causal), expected, (q, k, v), what)


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_kernels_match_naive_masked_reference(causal: bool) -> None:
    """Windows and block neighbourhoods narrower than the sequence, global tokens, a length that is
    no multiple of the chunk, key padding: against an explicit T x T mask."""
    length = 19
    q, k, v = _qkv(length=length, seed=1)
    mask = _lengths_mask([19, 11], length)
    cases = [
        (LocalAttention(window=2), _local_allowed(length, 2, 0, causal)),
        (LocalAttention(window=3, global_tokens=2, chunk_size=4), _local_allowed(length, 3, 2, causal)),
        (BlockSparseAttention(block_size=4), _block_allowed(length, 4, 1, 0, causal)),
        (BlockSparseAttention(4, num_neighbors=1, num_global_blocks=1), _block_allowed(length, 4, 1, 1, causal)),
        (BlockSparseAttention(3, num_neighbors=0, num_global_blocks=2), _block_allowed(length, 3, 0, 2, causal)),
    ]
    for kernel, allowed in cases:
        assert not allowed.all()  # genuinely sparse
        out = kernel(q, k, v, mask, causal=causal)
        _assert_same_with_grads(out, _reference(q, k, v, allowed, mask), (q, k, v), f"{kernel!r} causal={causal}")


def test_sparse_kernel_memory_is_banded() -> None:
    """The local kernel's largest intermediate grows with T (window + G), not T^2: at T = 2048,
    window 16, its biggest saved tensor is far below one T x T score matrix per head."""
    length, heads = 2048, 2
    q, k, v = (torch.randn(1, heads, length, 8, requires_grad=True) for _ in range(3))
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        LocalAttention(window=16, global_tokens=4)(q, k, v).sum().backward()
    assert largest <= heads * length * (3 * 16 + 4 + 1) * 2, largest
    assert largest < heads * length * length / 16


# ----------------------------------------------------------------------------------------------
# Linear attention


def _linear_reference(kernel: LinearAttention, q, k, v, mask, causal: bool) -> torch.Tensor:
    """sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j), as a T x T matrix."""
    weights = kernel.features(q) @ kernel.features(k).transpose(-1, -2)  # (B, h, T, T)
    if mask is not None:
        weights = weights * mask[:, None, None, :]
    if causal:
        weights = weights.tril()
    return (weights @ v) / weights.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("feature_map", ["elu", "random"])
def test_linear_attention_matches_its_explicit_formula(feature_map: str) -> None:
    """Non-causal and causal (chunked: 11 positions in chunks of 4), with key padding; large inputs
    exercise the stabilisers of the random features, which must cancel exactly."""
    for scale in (1.0, 4.0):
        q, k, v = _qkv(length=11, seed=2, scale=scale)
        mask = _lengths_mask([11, 5], 11)
        options = {"num_features": 12} if feature_map == "random" else {}
        kernel = attention_kernel("linear", head_dim=8, feature_map=feature_map, chunk_size=4, **options)
        for causal in (False, True):
            for m in (None, mask):
                expected = _linear_reference(kernel, q, k, v, m, causal)
                what = f"{feature_map} scale={scale} causal={causal} mask={m is not None}"
                _assert_same_with_grads(kernel(q, k, v, m, causal=causal), expected, (q, k, v), what)


def test_random_features_approximate_softmax_attention() -> None:
    """Many random features estimate softmax attention (Performer's point)."""
    q, k, v = (t.detach() * 0.5 for t in _qkv(batch=1, heads=1, length=6, dim=8, seed=3))
    kernel = LinearAttention("random", head_dim=8, num_features=8192, seed=1)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert (kernel(q, k, v) - expected).abs().max() < 0.05


def test_linear_random_projection_is_seeded_and_unsaved() -> None:
    """The same seed draws the same projection (every rank, every build), even under a default
    dtype or device that differs; it is not in the state dict."""
    a = LinearAttention("random", head_dim=8, num_features=20, seed=5)
    with torch.device("meta"):
        b = LinearAttention("random", head_dim=8, num_features=20, seed=5)
    assert torch.equal(a.projection(), b.projection()) and a.projection().shape == (20, 8)
    assert not torch.equal(a.projection(), LinearAttention("random", head_dim=8, num_features=20, seed=6).projection())
    assert a.projection(dtype=torch.float64).dtype == torch.float64
    assert not a.state_dict() and not dict(a.named_buffers())


# ----------------------------------------------------------------------------------------------
# Properties shared by every kernel


def _kernels() -> list:
    return [
        FullAttention(),
        LocalAttention(window=2, global_tokens=2, chunk_size=4),
        BlockSparseAttention(block_size=3, num_neighbors=1, num_global_blocks=1),
        LinearAttention("elu", chunk_size=4),
        LinearAttention("random", head_dim=8, num_features=16, chunk_size=4),
    ]


def test_causal_kernels_never_attend_to_the_future() -> None:
    """Perturbing position j (its query, key and value) leaves every output before j unchanged,
    and changes position j's."""
    length, j = 12, 7
    q, k, v = (t.detach() for t in _qkv(length=length, seed=4))
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, j:] += 3 * torch.randn_like(t[:, :, j:])
    mask = _lengths_mask([12, 10], length)
    for kernel in _kernels():
        for m in (None, mask):
            before, after = kernel(q, k, v, m, causal=True), kernel(*changed, m, causal=True)
            torch.testing.assert_close(after[:, :, :j], before[:, :, :j], atol=1e-12, rtol=0, msg=repr(kernel))
            assert not torch.allclose(after[:, :, j], before[:, :, j]), repr(kernel)


def test_padding_never_changes_real_outputs() -> None:
    """Appending padded positions holding random values changes no real position's output (nor its
    gradients), and nothing is NaN, padded positions included."""
    real, pad = 9, 5
    q, k, v = _qkv(length=real, seed=5)
    extra = [torch.randn(2, 2, pad, 8, dtype=torch.float64) * 10 for _ in range(3)]
    padded = [torch.cat([t, e], dim=2) for t, e in zip((q, k, v), extra)]
    mask = _lengths_mask([real, real], real + pad)
    short_mask = _lengths_mask([real, real - 3], real)  # padding inside the real part too
    long_mask = torch.cat([short_mask, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
    for kernel in _kernels():
        for causal in (False, True):
            for small, large in ((None, mask), (short_mask, long_mask)):
                out = kernel(*padded, large, causal=causal)
                assert torch.isfinite(out).all(), repr(kernel)
                expected = kernel(q, k, v, small, causal=causal)
                _assert_same_with_grads(out[:, :, :real], expected, (q, k, v), f"{kernel!r} causal={causal}")


def test_kernels_run_in_bfloat16() -> None:
    """Half-precision inputs (normalised in float32 inside): close to the float32 result, finite."""
    q, k, v = (t.detach().float() for t in _qkv(length=10, seed=6))
    mask = _lengths_mask([10, 4], 10)
    for kernel in _kernels():
        for causal in (False, True):
            expected = kernel(q, k, v, mask, causal=causal)
            out = kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, causal=causal)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), repr(kernel)
            torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2, msg=repr(kernel))


def test_sparse_dropout_drops_probabilities() -> None:
    q, k, v = (t.detach() for t in _qkv(length=10))
    kernel = LocalAttention(window=2, global_tokens=1)
    torch.manual_seed(0)
    first = kernel(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(kernel(q, k, v, dropout_p=0.5), first)
    assert not torch.allclose(first, kernel(q, k, v))


def test_misuse_names_the_argument() -> None:
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'.*block_sparse"):
        attention_kernel("nope")
    with pytest.raises(ValueError, match="needs head_dim"):
        attention_kernel("linear", feature_map="random")
    with pytest.raises(ValueError, match="set attention_dropout=0"):
        ParallelSelfAttention(16, 4, None, normal_init(0.1), normal_init(0.1), attention_dropout=0.1, kernel="linear")
    with pytest.raises(ValueError, match="use kernel='full' or kernel='linear'"):
        ParallelCrossAttention(16, 8, 4, None, normal_init(0.1), normal_init(0.1), kernel=LocalAttention(1))
    q, k, v = _qkv(length=5)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        FullAttention()(q, k, v, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, Tk\)"):
        LocalAttention(2)(q, k, v, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        FullAttention()(q[:, :, :3], k, v, causal=True)
    with pytest.raises(ValueError, match="rotary_dim=7 must be even"):
        RotaryEmbedding(7)


# ----------------------------------------------------------------------------------------------
# Cross-attention and rotary positions


def test_cross_attention_matches_naive_reference_and_respects_padding() -> None:
    """Queries of width 12 over a context of width 20 (3 heads), against torch softmax over q k^T
    with the mask; padded context tokens change nothing and get no gradient."""
    torch.manual_seed(0)
    attention = ParallelCrossAttention(12, 20, 3, None, normal_init(0.3), normal_init(0.3)).double()
    with torch.no_grad():
        attention.q.bias.normal_()
        attention.kv.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    context = torch.randn(2, 7, 20, dtype=torch.float64, requires_grad=True)
    mask = _lengths_mask([7, 3], 7)
    out = attention(x, context, mask)

    q = (x @ attention.q.weight.T + attention.q.bias).view(2, 5, 3, 4).transpose(1, 2)  # (B, h, Tq, d)
    k, v = (context @ attention.kv.weight.T + attention.kv.bias).chunk(2, dim=-1)
    k, v = (t.reshape(2, 7, 3, 4).transpose(1, 2) for t in (k, v))  # (B, h, Tk, d)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask[:, None, None, :], float("-inf"))
    attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 5, 12)
    expected = attended @ attention.out.weight.T + attention.out.bias
    torch.testing.assert_close(out, expected, **F64)

    out.square().sum().backward()
    assert context.grad[1, 3:].abs().max() == 0 and context.grad[1, :3].abs().max() > 0
    scrambled = context.detach().clone()
    scrambled[1, 3:] = 100 * torch.randn(4, 20, dtype=torch.float64)
    torch.testing.assert_close(attention(x, scrambled, mask), out, **F64)

    linear = ParallelCrossAttention(12, 20, 3, None, normal_init(0.3), normal_init(0.3), kernel="linear").double()
    assert linear(x, context, mask).shape == (2, 5, 12)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    """After rotation, q_s . k_t = f(s - t): shifting both positions leaves the score unchanged; norms
    are kept; partial rotary passes the other channels through."""
    rotary = RotaryEmbedding(8, base=100.0)
    generator = torch.Generator().manual_seed(0)
    qv, kv = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    length = 10
    q = qv.expand(1, 1, length, 8)
    k = kv.expand(1, 1, length, 8)
    rq, rk = rotary(q, k)
    scores = (rq @ rk.transpose(-1, -2))[0, 0]  # (T, T)
    for shift in (1, 3):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], **F64)
    assert not torch.allclose(scores[0, 1], scores[0, 2])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), **F64)
    shifted_q, _ = rotary(q, k, positions=torch.arange(length) + 5)
    torch.testing.assert_close(shifted_q[..., :-5, :], rq[..., 5:, :], **F64)
    partial_q, _ = RotaryEmbedding(8, rotary_dim=4)(q, k)
    assert torch.equal(partial_q[..., 4:], q[..., 4:]) and not torch.equal(partial_q[..., :4], q[..., :4])


def test_self_attention_causal_rotary_defaults_unchanged() -> None:
    """The defaults are the old module (full SDPA, no rotary); causal and rotary change it."""
    torch.manual_seed(0)
    plain = ParallelSelfAttention(16, 4, None, normal_init(0.3), normal_init(0.3))
    torch.manual_seed(0)
    decoder = ParallelSelfAttention(16, 4, None, normal_init(0.3), normal_init(0.3), causal=True, rotary=True)
    assert isinstance(plain.kernel, FullAttention) and plain.rotary is None
    assert plain.state_dict().keys() == decoder.state_dict().keys()
    x = torch.randn(2, 6, 16)
    out = decoder(x)
    changed = x.clone()
    changed[:, 4] += 1
    torch.testing.assert_close(decoder(changed)[:, :4], out[:, :4])
    assert not torch.allclose(plain(x), out)


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 against TP=1 built from the same seed


def _tp_parity(rank: int, world: int) -> None:
    torch.set_default_dtype(torch.float64)
    state = ParallelState.initialize(tensor_parallel=world)
    group, tp_rank = state.tp_group, state.tp_rank
    hidden, heads, length = 16, 4, 10
    init, out_init = normal_init(0.3), normal_init(0.2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, length, hidden, generator=generator)
    context = torch.randn(2, 7, 24, generator=generator)
    mask = _lengths_mask([length, 6], length)
    context_mask = _lengths_mask([7, 4], 7)

    def self_attention(g, sequence_parallel=False, **kw):
        torch.manual_seed(3)
        return ParallelSelfAttention(hidden, heads, g, init, out_init, sequence_parallel=sequence_parallel, **kw)

    def cross_attention(g):
        torch.manual_seed(3)
        return ParallelCrossAttention(hidden, 24, heads, g, init, out_init, context_init_method=normal_init(0.1))

    def check(name, ref, tp, inputs, run, local=slice(None)):
        """``local``: the slice of the sequence (dimension 1 of the first input and of the output)
        the TP module holds; the whole sequence unless sequence-parallel."""
        ref_in = [t.clone().requires_grad_() for t in inputs]
        tp_in = [t.clone().requires_grad_() for t in inputs]
        ref_out = run(ref, ref_in)
        tp_out = run(tp, [tp_in[0][:, local], *tp_in[1:]])
        upstream = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(5))
        ref_out.backward(upstream)
        tp_out.backward(upstream[:, local])
        torch.testing.assert_close(tp_out, ref_out[:, local], **F64, msg=f"{name}: output")
        torch.testing.assert_close(tp_in[0].grad[:, local], ref_in[0].grad[:, local], **F64, msg=f"{name}: dx")
        for a, b in zip(tp_in[1:], ref_in[1:]):
            torch.testing.assert_close(a.grad, b.grad, **F64, msg=f"{name}: dcontext")
        for (pname, p), (_, p_ref) in zip(tp.named_parameters(), ref.named_parameters()):
            if getattr(p, "tensor_model_parallel", False):
                expected = shard_of(p_ref.grad, tp_rank, world, p.partition_dim, p.partition_stride)
            else:
                expected = p_ref.grad
            torch.testing.assert_close(p.grad, expected, **F64, msg=f"{name}: {pname} gradient")

    for name, options in (
        ("local", dict(kernel="local", kernel_options={"window": 2, "global_tokens": 1}, causal=True, rotary=True)),
        ("block_sparse", dict(kernel="block_sparse", kernel_options={"block_size": 3, "num_global_blocks": 1})),
        ("linear", dict(kernel="linear", kernel_options={"feature_map": "random", "num_features": 6}, causal=True)),
    ):
        check(name, self_attention(None, **options), self_attention(group, **options), [x], lambda m, t: m(t[0], mask))
    # Sequence parallelism with a sparse kernel: each rank holds half of the sequence.
    options = dict(kernel="local", kernel_options={"window": 2})
    half = slice(tp_rank * length // world, (tp_rank + 1) * length // world)
    check("local, sequence-parallel", self_attention(None, **options), self_attention(group, True, **options), [x],
          lambda m, t: m(t[0], mask), local=half)  # fmt: skip
    cross = (cross_attention(None), cross_attention(group))
    check("cross", *cross, [x, context], lambda m, t: m(t[0], t[1], context_mask))


def test_attention_variants_tp2_match_single_process(tmp_path) -> None:
    """ParallelCrossAttention and ParallelSelfAttention with local, block-sparse and linear
    kernels (causal, rotary, sequence-parallel in places) at TP=2: outputs and input gradients
    equal one process's, weight gradients equal its shards."""
    run_distributed(_tp_parity, 2, tmp_path)
