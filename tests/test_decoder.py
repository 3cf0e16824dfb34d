"""TextDecoder: causality, context padding, the loss against F.cross_entropy, greedy and beam-search
generation (against an exhaustive search), the KV cache, and TP=2 parity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.model.decoder import TextDecoder
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState, gather_from_group, shard_of
from tests.distributed import run_distributed

BOS, EOS, PAD = 2, 3, 0
F64 = dict(atol=1e-9, rtol=1e-9)


def _decoder(
    group=None, vocab: int = 16, positions: str = "learned", seed: int = 1, token_std: float = 1.0, **kw
) -> TextDecoder:
    sizes = dict(max_length=8, hidden_size=16, num_layers=2, num_heads=4, ffn_size=32, context_size=12)
    sizes.update(kw)
    init = WeightInit(seed=seed, token_embedding_std=token_std)
    return TextDecoder(vocab, group=group, init=init, positions=positions, **sizes).eval()


def _context(batch: int = 3, keys: int = 5, width: int = 12, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, keys, width, generator=generator, dtype=dtype)
    lengths = torch.tensor([keys, 2, keys - 1][:batch])
    mask = torch.arange(keys)[None, :] < lengths[:, None]  # (B, Tk)
    return context, mask


def _ids(batch: int = 3, length: int = 7, vocab: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    ids[:, 0] = BOS
    lengths = torch.tensor([length, 3, length - 2][:batch])
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, T)
    ids[torch.arange(batch), lengths - 1] = EOS
    return ids.masked_fill(~mask, PAD), mask


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_and_context_padding(positions: str) -> None:
    """Changing a token changes no earlier position's logits; padded context positions (their
    values, or more of them) never change the output."""
    decoder = _decoder(positions=positions)
    context, mask = _context()
    ids, _ = _ids()
    logits = decoder(ids, context, mask)  # (B, T, V)
    assert logits.shape == (3, 7, 16)
    for position in (1, 4, 6):
        changed = ids.clone()
        changed[:, position] = (changed[:, position] + 5) % 16
        out = decoder(changed, context, mask)
        torch.testing.assert_close(out[:, :position], logits[:, :position], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, position:], logits[:, position:])
    # padding: garbage in the masked positions, and three more masked positions
    garbage = torch.where(mask[:, :, None], context, torch.full_like(context, 1e3))
    longer = torch.cat([garbage, torch.randn(3, 3, 12) * 50], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(decoder(ids, garbage, mask), logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder(ids, longer, longer_mask), logits, rtol=0, atol=1e-5)
    # ... and in generation (greedy and beam, with the cache)
    for beams in (1, 3):
        expected = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=beams)
        assert torch.equal(decoder.generate(longer, longer_mask, bos_id=BOS, eos_id=EOS, num_beams=beams), expected)


def test_loss_equals_cross_entropy_of_full_logits_with_tied_head() -> None:
    """The loss is F.cross_entropy of the next-token logits ignoring padding (with label smoothing
    too); the LM head is the embedding table; a batch with nothing to predict gives 0 with a graph."""
    decoder = _decoder().train()  # dropout 0: training mode changes nothing
    context, mask = _context()
    ids, ids_mask = _ids()
    logits = decoder(ids, context, mask)  # (B, T, V)
    hidden = decoder.hidden_states(ids, context, mask)
    torch.testing.assert_close(logits, hidden @ decoder.token_embedding.weight.T / 4.0)  # tied, / sqrt(16)
    assert not any("head" in name for name, _ in decoder.named_parameters())
    target = ids[:, 1:].masked_fill(~ids_mask[:, 1:], -100)
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(
            logits[:, :-1].reshape(-1, 16), target.reshape(-1), ignore_index=-100, label_smoothing=smoothing
        )
        torch.testing.assert_close(decoder.loss(ids, ids_mask, context, mask, label_smoothing=smoothing), expected)
    # the embedding's gradient comes from both the lookup and the head
    decoder.loss(ids, ids_mask, context, mask).backward()
    assert decoder.token_embedding.weight.grad[5:].abs().sum(dim=1).gt(0).all()  # rows never looked up: head only
    # nothing to predict: zero, finite, differentiable
    empty = torch.zeros_like(ids_mask)
    empty[:, 0] = True
    loss = decoder.loss(ids, empty, context, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="mask must be bool"):
        decoder.loss(ids, ids_mask.long(), context, mask)
    with pytest.raises(ValueError, match="max_length=8"):
        decoder(torch.full((1, 9), BOS), context[:1], mask[:1])


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cache_greedy_and_beam_of_one(positions: str) -> None:
    """Cached decoding equals recomputing the prefix; beam search with one beam is greedy; the
    greedy tokens are the argmax of the full forward pass on their own prefix."""
    decoder = _decoder(positions=positions)
    context, mask = _context()
    greedy, scores = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, return_scores=True)
    again, again_scores = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, use_cache=False, return_scores=True)
    assert torch.equal(greedy, again)
    torch.testing.assert_close(scores, again_scores)
    one, one_scores = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=1, return_scores=True)
    beam_one, beam_scores = decoder._beam_search(context, mask, 8, BOS, EOS, PAD, 1, 1.0, True)
    assert torch.equal(beam_one, greedy) and torch.equal(one, greedy)
    torch.testing.assert_close(beam_scores, scores)
    # EOS as every row's second choice for the first token: greedy passes it by, and so does one beam
    runner_up = decoder(torch.full((3, 1), BOS), context, mask)[:, 0].topk(2).indices[:, 1]  # (B,)
    for row in range(3):
        eos = int(runner_up[row])
        one_context, one_mask = context[row : row + 1], mask[row : row + 1]
        expected = decoder.generate(one_context, one_mask, bos_id=BOS, eos_id=eos)
        assert torch.equal(decoder.generate(one_context, one_mask, bos_id=BOS, eos_id=eos, num_beams=1), expected)
        beam, _ = decoder._beam_search(one_context, one_mask, 8, BOS, eos, PAD, 1, 1.0, True)
        assert torch.equal(beam, expected)
    logits = decoder(greedy[:, :-1], context, mask)  # (B, L - 1, V)
    for row in range(3):
        for t in range(1, greedy.shape[1]):
            if greedy[row, t - 1] in (EOS, PAD) and t > 1:
                assert greedy[row, t] == PAD
            else:
                assert greedy[row, t] == logits[row, t - 1].argmax()
    for beams in (2, 4):
        cached = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=beams, return_scores=True)
        recomputed = decoder.generate(
            context, mask, bos_id=BOS, eos_id=EOS, num_beams=beams, use_cache=False, return_scores=True
        )
        assert torch.equal(cached[0], recomputed[0])
        torch.testing.assert_close(cached[1], recomputed[1])
        assert (cached[1] >= scores - 1e-6).all()  # never worse than greedy with this many steps


def _exhaustive(decoder: TextDecoder, context, mask, max_new: int, penalty: float):
    """The best sequence and its score per context row, by scoring every sequence BOS y_1 .. y_n
    (y_n = EOS, or n = max_new without EOS) with sum log p(y_i) / n ** penalty."""
    vocab, batch = decoder.vocab_size, context.shape[0]
    best = [(-math.inf, None)] * batch
    # log-probabilities of every prefix, computed once per prefix for all rows
    cache: dict[tuple, torch.Tensor] = {}

    def log_probs(prefix: tuple) -> torch.Tensor:
        if prefix not in cache:
            ids = torch.tensor([[BOS, *prefix]] * batch)
            with torch.no_grad():
                cache[prefix] = torch.log_softmax(decoder(ids, context, mask)[:, -1].double(), dim=-1)  # (B, V)
        return cache[prefix]

    for n in range(1, max_new + 1):
        for sequence in itertools.product(range(vocab), repeat=n):
            if EOS in sequence[:-1] or (n < max_new and sequence[-1] != EOS):
                continue
            total = sum(log_probs(sequence[:i])[:, sequence[i]] for i in range(n))  # (B,)
            score = total / n**penalty
            for row in range(batch):
                if score[row] > best[row][0]:
                    best[row] = (score[row].item(), sequence)
    return best


@pytest.mark.parametrize("penalty", [1.0, 0.0, -0.5])
def test_beam_search_finds_the_exhaustive_best_and_eos_stops(penalty: float) -> None:
    """On V=5, three generated tokens: with enough beams to keep every prefix (100 >= 4 x 4 x 5),
    beam search returns the sequence of highest length-normalised score among all of them
    (enumerated), for length penalties 1 (per-token mean), 0 (the raw sum) and -0.5 (short favoured more)."""
    decoder = _decoder(vocab=5, max_length=4, token_std=0.3).double()
    context, mask = _context(dtype=torch.float64, seed=penalty.__hash__() % 7)
    ids, scores = decoder.generate(
        context, mask, bos_id=BOS, eos_id=EOS, num_beams=100, length_penalty=penalty, return_scores=True
    )
    best = _exhaustive(decoder, context, mask, 3, penalty)
    _, greedy = decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, length_penalty=penalty, return_scores=True)
    assert (greedy < scores - 1e-6).any(), "a case where greedy decoding misses the best sequence"
    for row, (score, sequence) in enumerate(best):
        expected = torch.full((ids.shape[1],), PAD)
        expected[: len(sequence) + 1] = torch.tensor([BOS, *sequence])
        assert torch.equal(ids[row], expected), (row, ids[row], sequence)
        assert scores[row].item() == pytest.approx(score, abs=1e-9)
    assert ids.shape[1] == max(len(sequence) for _, sequence in best) + 1


def test_eos_stops_generation() -> None:
    """Rows stop at their first EOS (then padding), generation ends once every row has, and a row
    without EOS runs to max_length."""
    decoder = _decoder(vocab=16, token_std=0.1)  # smaller embeddings: an untrained tied decoder repeats less
    context, mask = _context()
    never = decoder.generate(context, mask, bos_id=BOS, eos_id=1, max_length=8)  # token 1: not produced here
    assert never.shape == (3, 8) and not (never[:, 1:] == 1).any()
    eos = int(never[1, 2])  # row 1's second generated token as the end of sequence
    assert eos != never[1, 1]
    stopped = decoder.generate(context, mask, bos_id=BOS, eos_id=eos, max_length=8)
    lengths = []
    for row in range(3):
        hits = (never[row, 1:] == eos).nonzero()
        length = int(hits[0]) + 2 if len(hits) else 8  # through the first EOS
        lengths.append(length)
        assert torch.equal(stopped[row, :length], never[row, :length])
        assert (stopped[row, length:] == PAD).all()
    assert stopped.shape[1] == max(lengths) and lengths[1] == 3 and max(lengths) == 8
    alone = decoder.generate(context[1:2], mask[1:2], bos_id=BOS, eos_id=eos, max_length=8)
    assert torch.equal(alone, never[1:2, :3])  # every row done: generation ends there
    beams = decoder.generate(context, mask, bos_id=BOS, eos_id=eos, max_length=8, num_beams=3)
    for row in beams:
        ends = (row == eos).nonzero()
        if len(ends):
            assert (row[int(ends[0]) + 1 :] == PAD).all()
    with pytest.raises(ValueError, match="max_length=9"):
        decoder.generate(context, mask, max_length=9, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="num_beams=0"):
        decoder.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=0)
    with pytest.raises(ValueError, match="context_size=12"):
        decoder.generate(context[..., :8], mask, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="positions='absolute'"):
        _decoder(positions="absolute")


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 against TP=1 built from the same seed


def _tp_parity(rank: int, world: int) -> None:
    torch.set_default_dtype(torch.float64)
    state = ParallelState.initialize(tensor_parallel=world)
    group, tp_rank = state.tp_group, state.tp_rank
    context, mask = _context(dtype=torch.float64)
    ids, ids_mask = _ids()
    for positions in ("learned", "rotary"):
        ref, tp = _decoder(None, positions=positions), _decoder(group, positions=positions)
        ref_context, tp_context = context.clone().requires_grad_(), context.clone().requires_grad_()
        ref_loss = ref.loss(ids, ids_mask, ref_context, mask, label_smoothing=0.1)
        tp_loss = tp.loss(ids, ids_mask, tp_context, mask, label_smoothing=0.1)
        torch.testing.assert_close(tp_loss, ref_loss, **F64, msg=f"{positions}: loss")
        ref_loss.backward()
        tp_loss.backward()
        torch.testing.assert_close(tp_context.grad, ref_context.grad, **F64, msg=f"{positions}: dcontext")
        for (name, p), (_, p_ref) in zip(tp.named_parameters(), ref.named_parameters()):
            expected = p_ref.grad
            if getattr(p, "tensor_model_parallel", False):
                expected = shard_of(p_ref.grad, tp_rank, world, p.partition_dim, p.partition_stride)
            torch.testing.assert_close(p.grad, expected, **F64, msg=f"{positions}: {name} gradient")
        with torch.no_grad():
            logits = tp(ids, context, mask)
            assert logits.shape[-1] == 8  # V / tp
            torch.testing.assert_close(gather_from_group(logits, group), ref(ids, context, mask), **F64)
        for beams in (1, 3):
            expected = ref.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=beams, return_scores=True)
            got = tp.generate(context, mask, bos_id=BOS, eos_id=EOS, num_beams=beams, return_scores=True)
            assert torch.equal(got[0], expected[0]), f"{positions}, {beams} beams: {got[0]} != {expected[0]}"
            torch.testing.assert_close(got[1], expected[1], **F64)
            everyone = [torch.empty_like(got[0]) for _ in range(world)]
            dist.all_gather(everyone, got[0], group=group)
            assert all(torch.equal(other, got[0]) for other in everyone)


def test_decoder_tp2_matches_single_process(tmp_path) -> None:
    """At TP=2 (learned and rotary positions): the loss (label smoothing on), the context's
    gradient and the gathered logits equal one process's, weight gradients equal its shards, and
    greedy and beam-search generation return the same tokens and scores on both ranks."""
    run_distributed(_tp_parity, 2, tmp_path)
