"""Fusion layers (megamm.model.fusion) against naive references, masking rules, and TP=2 parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megamm.model.fusion import (
    BottleneckFusion,
    ConcatFusion,
    GatedCrossAttentionBlock,
    WeightedFusion,
    gated_positions,
)
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState, shard_of
from tests.distributed import run_distributed

F64 = dict(atol=1e-10, rtol=1e-10)
INIT = WeightInit(seed=3)
HIDDEN, CONTEXT, HEADS, FFN = 16, 12, 4, 32


def _mask(lengths: list[int], total: int) -> torch.Tensor:
    """(B, total) bool: the first lengths[b] positions of row b are real."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def _randomise(module: torch.nn.Module, seed: int, rank: int = 0, size: int = 1) -> None:
    """Non-trivial biases and norm weights (they start at 0 and 1), alike for every TP layout of
    ``module`` (this rank ``rank`` of ``size``): each is drawn in its full shape from one generator,
    in order, and a sharded one keeps its shard."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not (name.endswith("bias") or "norm" in name):
                continue
            sharded = getattr(param, "tensor_model_parallel", False)
            shape = list(param.shape)
            if sharded:
                shape[param.partition_dim] *= size
            full = 0.3 * torch.randn(shape, generator=generator, dtype=param.dtype)
            if sharded:
                full = shard_of(full, rank, size, param.partition_dim, param.partition_stride)
            param.copy_(full + (1.0 if name.endswith("norm.weight") else 0.0))


def _gated(group=None) -> GatedCrossAttentionBlock:
    return GatedCrossAttentionBlock("text.gated.1", HIDDEN, CONTEXT, HEADS, FFN, group, INIT, num_layers=4)


def _bottleneck(group=None, modalities=("image", "text", "audio"), layers: int = 2) -> BottleneckFusion:
    return BottleneckFusion("fusion.bottleneck", modalities, HIDDEN, 3, layers, HEADS, FFN, group, INIT)


def _concat(group=None) -> ConcatFusion:
    widths = {"image": 6, "text": 8, "audio": 4}
    return ConcatFusion("fusion.concat", ["image", "text", "audio"], widths, FFN, 10, group, INIT)


# ----------------------------------------------------------------------------------------------
# Gated cross-attention


def _naive_gated(block: GatedCrossAttentionBlock, x, context, mask) -> torch.Tensor:
    """Flamingo's block by hand from the module's (TP=1) weights: softmax attention, GELU MLP."""
    batch, length, hidden = x.shape
    d = hidden // HEADS

    def heads(t):  # (B, T, H) -> (B, h, T, d)
        return t.view(batch, t.shape[1], HEADS, d).transpose(1, 2)

    a = block.attn
    ln = F.layer_norm(x, (hidden,), block.attn_norm.weight, block.attn_norm.bias, block.attn_norm.eps)
    q = heads(ln @ a.q.weight.T + a.q.bias)
    kv = context @ a.kv.weight.T + a.kv.bias  # (B, Tk, 2H): keys, then values
    k, v = heads(kv[..., :hidden]), heads(kv[..., hidden:])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, h, T, Tk)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    has = mask.any(dim=1)  # (B,)
    probs = torch.where(has[:, None, None, None], torch.softmax(scores, dim=-1), 0.0)
    attended = (probs @ v).transpose(1, 2).reshape(batch, length, hidden) @ a.out.weight.T + a.out.bias
    y = x + torch.tanh(block.attn_gate) * attended
    ln2 = F.layer_norm(y, (hidden,), block.mlp_norm.weight, block.mlp_norm.bias, block.mlp_norm.eps)
    mlp = F.gelu(ln2 @ block.mlp.up.weight.T + block.mlp.up.bias) @ block.mlp.down.weight.T + block.mlp.down.bias
    y = y + torch.tanh(block.mlp_gate) * mlp
    return torch.where(has[:, None, None], y, x)


def test_gated_block_with_closed_gates_is_the_identity_and_its_gates_learn() -> None:
    block = _gated()
    _randomise(block, 0)  # biases nonzero: the branches' outputs are far from zero
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, HIDDEN, generator=generator, requires_grad=True)
    context = torch.randn(3, 7, CONTEXT, generator=generator)
    out = block(x, context, _mask([7, 4, 2], 7))
    assert torch.equal(out, x)  # bitwise
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    assert block.attn_gate.grad.abs().item() > 1e-3 and block.mlp_gate.grad.abs().item() > 1e-3
    assert block.attn_gate.shape == (1,) and block.attn_gate.item() == 0.0


def test_gated_block_matches_naive_reference() -> None:
    block = _gated().double()
    _randomise(block, 1)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.mlp_gate.fill_(-0.4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, HIDDEN, generator=generator, dtype=torch.float64)
    context = torch.randn(3, 7, CONTEXT, generator=generator, dtype=torch.float64)
    mask = _mask([7, 3, 0], 7)
    inputs = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    ref_inputs = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    out = block(*inputs, mask)
    expected = _naive_gated(block, *ref_inputs, mask)
    torch.testing.assert_close(out, expected, **F64)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(upstream)
    expected.backward(upstream)
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, **F64)
    assert not torch.equal(out[0], x[0])


def test_gated_block_row_without_context_and_context_padding() -> None:
    block = _gated().double()
    _randomise(block, 2)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.mlp_gate.fill_(0.5)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, HIDDEN, generator=generator, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 6, CONTEXT, generator=generator, dtype=torch.float64)
    mask = _mask([6, 2, 0], 6)
    out = block(x, context, mask)
    assert torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])  # no context: exactly x
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())
    # Padded context positions (random values, masked) change nothing.
    padded = torch.cat([context, 100 * torch.randn(3, 4, CONTEXT, generator=generator, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(block(x, padded, padded_mask), out, **F64)
    # A batch-wide (1, Tk) mask with no real token: every row unchanged.
    assert torch.equal(block(x, context, torch.zeros(1, 6, dtype=torch.bool)), x)


def test_gated_positions() -> None:
    assert gated_positions(6, 2) == (1, 3, 5)
    assert gated_positions(6, 1) == tuple(range(6))
    assert gated_positions(7, 3) == (2, 5)
    assert gated_positions(4, 4) == (3,)
    with pytest.raises(ValueError, match="every=0"):
        gated_positions(6, 0)
    with pytest.raises(ValueError, match="every=7 exceeds num_layers=6"):
        gated_positions(6, 7)


# ----------------------------------------------------------------------------------------------
# Bottleneck fusion


def _streams(generator, batch: int = 3) -> dict[str, torch.Tensor]:
    lengths = {"image": 4, "text": 6, "audio": 5}
    return {m: torch.randn(batch, t, HIDDEN, generator=generator, dtype=torch.float64) for m, t in lengths.items()}


def test_bottleneck_missing_modality_in_a_row_equals_running_without_it() -> None:
    fusion = _bottleneck().double()
    _randomise(fusion, 3)
    generator = torch.Generator().manual_seed(3)
    streams = _streams(generator)
    masks = {"text": _mask([6, 3, 6], 6)}
    # row 1 lacks audio (its values are garbage), row 2 has no modality at all
    present = {"audio": torch.tensor([True, False, False]), "image": torch.tensor([True, True, False]),
               "text": torch.tensor([True, True, False])}  # fmt: skip
    streams["audio"][1] = float("nan")  # never read
    out, bottleneck = fusion(streams, masks, present)
    without = {m: s for m, s in streams.items() if m != "audio"}
    out_without, bottleneck_without = fusion(without, masks, {m: present[m] for m in without})
    assert set(out) == {"image", "text", "audio"} and set(out_without) == {"image", "text"}
    torch.testing.assert_close(bottleneck[1], bottleneck_without[1], **F64)
    for m in ("image", "text"):
        torch.testing.assert_close(out[m][1], out_without[m][1], **F64)
    assert not torch.allclose(bottleneck[0], bottleneck_without[0])  # row 0 does see the audio
    # the audio stream of row 1 is left as it came; row 2 keeps the learned tokens, streams unchanged
    assert torch.isnan(out["audio"][1]).all() and torch.isfinite(out["audio"][0]).all()
    torch.testing.assert_close(bottleneck[2], fusion.tokens[0], **F64)
    assert torch.equal(out["image"][2], streams["image"][2])
    assert torch.isfinite(bottleneck).all()
    (out["image"].sum() + out["text"].sum() + bottleneck.sum()).backward()  # the NaNs reach no gradient
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_bottleneck_with_one_modality_is_plain_attention_over_tokens_and_bottleneck() -> None:
    fusion = _bottleneck().double()
    _randomise(fusion, 4)
    generator = torch.Generator().manual_seed(4)
    text = torch.randn(2, 6, HIDDEN, generator=generator, dtype=torch.float64)
    mask = _mask([6, 4], 6)
    out, bottleneck = fusion({"text": text}, {"text": mask})
    x, z = text, fusion.tokens.expand(2, -1, -1)
    joint_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    for layer in fusion.layers:
        joint = layer["text"](torch.cat([x, z], dim=1), joint_mask)  # a plain self-attention block
        x, z = joint[:, :6], joint[:, 6:]
    torch.testing.assert_close(out["text"], x, **F64)
    torch.testing.assert_close(bottleneck, z, **F64)
    # every block took part in the graph (ZeRO-3 gathers and reduces them all on every rank)
    (out["text"].sum() + bottleneck.sum()).backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_bottleneck_rejects_other_widths() -> None:
    fusion = _bottleneck(modalities=("image", "text"), layers=1)
    with pytest.raises(ValueError, match="project a stream of another width"):
        fusion({"image": torch.randn(2, 3, HIDDEN + 1)})
    with pytest.raises(ValueError, match="not built for"):
        fusion({"video": torch.randn(2, 3, HIDDEN)})


# ----------------------------------------------------------------------------------------------
# Weighted fusion


def test_weighted_fusion_weights_per_task() -> None:
    fusion = WeightedFusion(["image", "text", "audio"], ["retrieval", "captioning", "vqa"])
    for task in fusion.tasks:
        torch.testing.assert_close(fusion.weights(task), torch.full((3,), 1 / 3))
    generator = torch.Generator().manual_seed(5)
    reps = {m: torch.randn(4, 8, generator=generator) for m in fusion.modalities}
    loss = (fusion(reps, "vqa") * torch.randn(4, 8, generator=generator)).sum()
    loss.backward()
    with torch.no_grad():
        fusion.task_logits -= 1.0 * fusion.task_logits.grad
    vqa, retrieval = fusion.weights("vqa"), fusion.weights("retrieval")
    assert not torch.allclose(vqa, retrieval)
    torch.testing.assert_close(retrieval, fusion.weights("captioning"))
    torch.testing.assert_close(retrieval, torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        fusion(reps, "ocr")


def test_weighted_fusion_masked_softmax_ignores_missing_modalities() -> None:
    fusion = WeightedFusion(["image", "text", "audio"], ["retrieval", "vqa"]).double()
    with torch.no_grad():
        fusion.task_logits.copy_(torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7]]))
    generator = torch.Generator().manual_seed(6)
    reps = {m: torch.randn(3, 8, generator=generator, dtype=torch.float64) for m in fusion.modalities}
    reps["audio"][1] = float("inf")  # missing in row 1: never read
    present = {"audio": torch.tensor([True, False, False]), "text": torch.tensor([True, True, False]),
               "image": torch.tensor([True, True, False])}  # fmt: skip
    out = fusion(reps, "vqa", present)
    logits = fusion.task_logits[1].detach()
    row0 = torch.softmax(logits, 0)  # every modality
    torch.testing.assert_close(out[0], sum(w * reps[m][0] for w, m in zip(row0, fusion.modalities)), **F64)
    row1 = torch.softmax(logits[:2], 0)  # image and text only
    torch.testing.assert_close(out[1], row1[0] * reps["image"][1] + row1[1] * reps["text"][1], **F64)
    assert torch.equal(out[2], torch.zeros(8, dtype=torch.float64))  # no modality: zeros
    # equals the fusion of the present ones (audio not passed at all)
    only = fusion({"image": reps["image"], "text": reps["text"]}, "vqa")
    torch.testing.assert_close(out[1], only[1], **F64)


# ----------------------------------------------------------------------------------------------
# Concatenation + MLP


def test_concat_fusion_matches_naive_reference() -> None:
    fusion = _concat().double()
    _randomise(fusion, 7)
    generator = torch.Generator().manual_seed(7)
    reps = {m: torch.randn(3, w, generator=generator, dtype=torch.float64) for m, w in fusion.input_sizes.items()}
    reps["text"][2] = float("nan")  # missing in row 2
    present = {"text": torch.tensor([True, True, False])}
    out = fusion({"image": reps["image"], "text": reps["text"]}, present)  # audio absent from the batch
    indicators = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    text = reps["text"].clone()
    text[2] = 0.0
    features = torch.cat([reps["image"], text, torch.zeros(3, 4, dtype=torch.float64), indicators], dim=1)
    expected = F.gelu(features @ fusion.up.weight.T + fusion.up.bias) @ fusion.down.weight.T + fusion.down.bias
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, expected, **F64)


# ----------------------------------------------------------------------------------------------
# TP=2 against TP=1 from the same seed


def _check(name: str, ref, tp, tp_rank: int, world: int, outputs, inputs_ref, inputs_tp) -> None:
    ref_out, tp_out = outputs
    for a, b in zip(tp_out, ref_out):
        torch.testing.assert_close(a, b, **F64, msg=f"{name}: output")
    generator = torch.Generator().manual_seed(9)
    upstream = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in ref_out]
    sum((t * u).sum() for t, u in zip(ref_out, upstream)).backward()
    sum((t * u).sum() for t, u in zip(tp_out, upstream)).backward()
    for a, b in zip(inputs_tp, inputs_ref):
        torch.testing.assert_close(a.grad, b.grad, **F64, msg=f"{name}: input gradient")
    for (pname, p), (_, p_ref) in zip(tp.named_parameters(), ref.named_parameters(), strict=True):
        expected = p_ref.grad
        if getattr(p, "tensor_model_parallel", False):
            expected = shard_of(p_ref.grad, tp_rank, world, p.partition_dim, p.partition_stride)
        torch.testing.assert_close(p.grad, expected, **F64, msg=f"{name}: {pname} gradient")


def _tp_parity(rank: int, world: int) -> None:
    torch.set_default_dtype(torch.float64)
    state = ParallelState.initialize(tensor_parallel=world)
    group, tp_rank = state.tp_group, state.tp_rank
    generator = torch.Generator().manual_seed(8)

    # gated cross-attention, gates open, one row without context
    gated = (_gated(None), _gated(group))
    for module in gated:
        _randomise(module, 10, tp_rank, world)
        with torch.no_grad():
            module.attn_gate.fill_(0.6)
            module.mlp_gate.fill_(-0.3)
    x = torch.randn(3, 5, HIDDEN, generator=generator)
    context = torch.randn(3, 7, CONTEXT, generator=generator)
    mask = _mask([7, 3, 0], 7)
    ref_in = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    tp_in = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    outputs = ([gated[0](*ref_in, mask)], [gated[1](*tp_in, mask)])
    _check("gated", *gated, tp_rank, world, outputs, ref_in, tp_in)

    # bottleneck fusion: audio absent from the batch, text missing in one row
    bottleneck = (_bottleneck(None), _bottleneck(group))
    for module in bottleneck:
        _randomise(module, 11, tp_rank, world)
    streams = {m: t for m, t in _streams(generator).items() if m != "audio"}
    masks = {"text": _mask([6, 2, 5], 6)}
    present = {"text": torch.tensor([True, False, True])}
    ref_in = [t.clone().requires_grad_() for t in streams.values()]
    tp_in = [t.clone().requires_grad_() for t in streams.values()]

    def run(module, inputs):
        out, z = module(dict(zip(streams, inputs)), masks, present)
        return [out["image"], out["text"], z]

    outputs = (run(bottleneck[0], ref_in), run(bottleneck[1], tp_in))
    _check("bottleneck", *bottleneck, tp_rank, world, outputs, ref_in, tp_in)

    # concatenation + MLP
    concat = (_concat(None), _concat(group))
    for module in concat:
        _randomise(module, 12, tp_rank, world)
    reps = {m: torch.randn(3, w, generator=generator) for m, w in concat[0].input_sizes.items()}
    present = {"audio": torch.tensor([False, True, True])}
    ref_in = [t.clone().requires_grad_() for t in reps.values()]
    tp_in = [t.clone().requires_grad_() for t in reps.values()]
    outputs = ([concat[0](dict(zip(reps, ref_in)), present)], [concat[1](dict(zip(reps, tp_in)), present)])
    _check("concat", *concat, tp_rank, world, outputs, ref_in, tp_in)


def test_fusion_tp2_matches_single_process(tmp_path) -> None:
    """Gated cross-attention, bottleneck fusion and concat + MLP at TP=2: outputs and input
    gradients equal one process's built from the same seed; weight gradients equal its shards."""
    run_distributed(_tp_parity, 2, tmp_path)
