"""Image-text matching (hard-negative mining, loss), VQA classification and generative answers,
and TP=2 parity of the heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.model.decoder import TextDecoder
from megamm.model.init import WeightInit
from megamm.model.objectives import ImageTextMatchingHead, VQAClassifier, answer_loss, mine_hard_negatives
from megamm.parallel import ParallelState, shard_of
from tests.distributed import run_distributed

F64 = dict(atol=1e-9, rtol=1e-9)


def _similarity(batch: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, batch, generator=generator) * 2 + 3 * torch.eye(batch)  # positives highest


def test_hard_negatives_skip_the_positive_follow_the_similarity_and_are_deterministic() -> None:
    # a circulant similarity, sim[i, j] = f((j - i) mod B): every image's (and text's) negatives
    # have the same distribution over the offsets 1 .. B - 1, softmax of f there
    batch = 32
    f = torch.randn(batch, generator=torch.Generator().manual_seed(0)) * 1.5
    f[0] = 5.0  # the positives, above every negative
    index = torch.arange(batch)
    similarity = f[(index[None, :] - index[:, None]) % batch]  # (B, B)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, batch)
    for _ in range(150):
        text_for_image, image_for_text = mine_hard_negatives(similarity, generator)
        assert text_for_image.dtype == torch.int64 and text_for_image.shape == (batch,)
        counts[0] += torch.bincount((text_for_image - index) % batch, minlength=batch)
        counts[1] += torch.bincount((index - image_for_text) % batch, minlength=batch)
    assert (counts[:, 0] == 0).all()  # never the positive
    expected = torch.cat([torch.zeros(1), torch.softmax(f[1:], dim=0)])
    torch.testing.assert_close(counts / counts.sum(dim=1, keepdim=True), expected.expand(2, -1), atol=0.03, rtol=0)
    # peaked similarities: the most similar negative, even with the positive above it
    peaked = torch.full((5, 5), -10.0)
    peaked.fill_diagonal_(100.0)
    hardest_text = torch.tensor([3, 0, 4, 1, 2])  # for image i; so text j's hardest image is i with hardest_text[i] = j
    hardest_image = torch.argsort(hardest_text)
    peaked[torch.arange(5), hardest_text] = 50.0
    for seed in range(5):
        text_for_image, image_for_text = mine_hard_negatives(peaked, torch.Generator().manual_seed(seed))
        assert torch.equal(text_for_image, hardest_text) and torch.equal(image_for_text, hardest_image)
    # deterministic for a fixed generator, and the generator matters
    first = mine_hard_negatives(_similarity(16), torch.Generator().manual_seed(7))
    again = mine_hard_negatives(_similarity(16), torch.Generator().manual_seed(7))
    other = mine_hard_negatives(_similarity(16), torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="at least 2"):
        mine_hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        mine_hard_negatives(torch.zeros(3, 4))


def test_itm_loss_equals_a_naive_reference() -> None:
    """matching_loss = mean over the 3B pairs (B positives, B image + hard text, B text + hard
    image) of -log p(label), each pair scored by the head alone; gradients reach the features."""
    torch.manual_seed(0)
    head = ImageTextMatchingHead(8, None, WeightInit(seed=3))
    images, texts = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T * 10

    def fuse(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return torch.tanh(images[image_index] + texts[text_index])  # (N, H)

    loss = head.matching_loss(fuse, similarity, torch.Generator().manual_seed(1))
    text_for_image, image_for_text = head.mine_hard_negatives(similarity, torch.Generator().manual_seed(1))
    pairs = [(i, i, 1) for i in range(5)]
    pairs += [(i, int(text_for_image[i]), 0) for i in range(5)]
    pairs += [(int(image_for_text[j]), j, 0) for j in range(5)]
    terms = []
    for image, text, label in pairs:
        logits = head(torch.tanh(images[image] + texts[text])[None])[0]  # (2,)
        terms.append(-torch.log_softmax(logits, dim=0)[label])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0
    assert head(torch.randn(4, 8)).shape == (4, 2)


def test_vqa_loss_ignores_missing_answers_and_is_zero_without_any() -> None:
    torch.manual_seed(0)
    head = VQAClassifier(8, 20, None, WeightInit(seed=4))
    pooled = torch.randn(4, 8, requires_grad=True)
    answer = torch.tensor([3, -1, 19, -1])
    loss = head.loss(pooled, answer)
    valid = answer != -1
    torch.testing.assert_close(loss, F.cross_entropy(head(pooled[valid]), answer[valid]))
    changed = pooled.detach().clone()
    changed[~valid] += 100.0
    torch.testing.assert_close(head.loss(changed, answer), loss)
    none = head.loss(pooled, torch.full((4,), -1))
    assert none.item() == 0.0 and torch.isfinite(none) and none.requires_grad
    none.backward()
    assert torch.isfinite(pooled.grad).all() and pooled.grad.abs().sum() == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    with pytest.raises(RuntimeError, match="num_answers"):
        head.loss(pooled.detach(), torch.tensor([20, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"answer must be \(B,\)"):
        head.loss(pooled.detach(), torch.zeros(4, 1, dtype=torch.long))


def test_answer_loss_is_the_decoder_loss_on_answers() -> None:
    """Generative VQA: the decoder's loss on the answer tokens given the context; a sample
    without a question (all-False answer mask) counts for nothing."""
    decoder = TextDecoder(16, 6, 16, 1, 2, 32, 12, None, WeightInit(seed=2))
    context = torch.randn(3, 4, 12)
    answer_ids = torch.tensor([[2, 7, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0], [2, 9, 11, 3, 0, 0]])
    answer_mask = answer_ids != 0
    loss = answer_loss(decoder, answer_ids, answer_mask, context)
    torch.testing.assert_close(loss, decoder.loss(answer_ids, answer_mask, context))
    alone = decoder.loss(answer_ids[[0, 2]], answer_mask[[0, 2]], context[[0, 2]])
    torch.testing.assert_close(loss, alone)


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 against TP=1 built from the same seed


def _tp_parity(rank: int, world: int) -> None:
    torch.set_default_dtype(torch.float64)
    state = ParallelState.initialize(tensor_parallel=world)
    group, tp_rank = state.tp_group, state.tp_rank
    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(6, 8, generator=generator)
    answer = torch.tensor([1, -1, 4, 19, -1, 0])
    similarity = torch.randn(6, 6, generator=generator)

    def check(name, ref, tp, run):
        ref_in, tp_in = pooled.clone().requires_grad_(), pooled.clone().requires_grad_()
        ref_out, tp_out = run(ref, ref_in), run(tp, tp_in)
        torch.testing.assert_close(tp_out, ref_out, **F64, msg=f"{name}: output")
        ref_out.sum().backward()
        tp_out.sum().backward()
        torch.testing.assert_close(tp_in.grad, ref_in.grad, **F64, msg=f"{name}: input gradient")
        for (pname, p), (_, p_ref) in zip(tp.named_parameters(), ref.named_parameters()):
            expected = p_ref.grad
            if getattr(p, "tensor_model_parallel", False):
                expected = shard_of(p_ref.grad, tp_rank, world, p.partition_dim, p.partition_stride)
            torch.testing.assert_close(p.grad, expected, **F64, msg=f"{name}: {pname} gradient")

    vqa = [VQAClassifier(8, 20, g, WeightInit(seed=4)) for g in (None, group)]
    check("vqa logits", *vqa, lambda m, x: m(x))
    vqa = [VQAClassifier(8, 20, g, WeightInit(seed=4)) for g in (None, group)]
    check("vqa loss", *vqa, lambda m, x: m.loss(x, answer))
    itm = [ImageTextMatchingHead(8, g, WeightInit(seed=3)) for g in (None, group)]
    fused = lambda x: lambda i, t: x[i] * x[t]  # noqa: E731
    check("itm", *itm, lambda m, x: m.matching_loss(fused(x), similarity, torch.Generator().manual_seed(5)))
    # the ranks fuse the same pairs even when their generators differ: the first rank's are taken
    mined = mine_hard_negatives(similarity, torch.Generator().manual_seed(100 + rank), group)
    first = mine_hard_negatives(similarity, torch.Generator().manual_seed(100))
    assert all(torch.equal(a, b) for a, b in zip(mined, first))


def test_heads_tp2_match_single_process(tmp_path) -> None:
    """At TP=2 the VQA classifier's logits and loss and the ITM loss (negatives mined on the
    group's first rank) equal one process's, with input gradients equal and weight gradients
    equal to its shards."""
    run_distributed(_tp_parity, 2, tmp_path)
