"""The whole multi-modal model (every encoder, fusion kind and objective):

- at TP=2 its loss, every objective's loss and every gradient equal one process's, in fp32;
- any subset of modalities: a modality missing in a row changes nothing the row's others see,
  rows lacking a side drop out of that pair's contrastive loss exactly as if they were not there;
- ranks holding different modality sets (image+text on one, audio+text on another) train
  together under ZeRO-3 without hanging, and generate captions together (a hang fails the
  test after its own timeout).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megamm.config import load_config
from megamm.model import MultiModalTransformer
from megamm.model.heads import contrastive_loss
from megamm.parallel import ParallelState, shard_of
from tests.distributed import run_distributed

BATCH = 4
OBJECTIVES = ("image_text", "audio_text", "image_audio", "captioning", "itm", "vqa", "vqa_generative")


def _config(kind: str = "gated", extra: tuple[str, ...] = ()):
    return load_config("tiny", [f"model.fusion.kind={kind}", "micro_batch_size=4", *extra])


def _batch(config, seed: int = 0, rows: int = BATCH) -> dict[str, torch.Tensor]:
    """Random inputs of every kind; row 1 has no audio, row 2 no question."""
    generator = torch.Generator().manual_seed(seed)
    text, image = config.model.text, config.model.image
    length = text.max_length

    def tokens(low: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(4, text.vocab_size, (rows, length), generator=generator)
        lengths = torch.randint(low, length + 1, (rows, 1), generator=generator)
        mask = torch.arange(length)[None, :] < lengths
        ids[:, 0] = text.bos_id
        return ids.masked_fill(~mask, text.pad_id), mask

    text_ids, text_mask = tokens(3)
    question_ids, question_mask = tokens(3)
    answer_ids, answer_mask = tokens(2)
    question_ids[2], question_mask[2], answer_mask[2] = text.pad_id, False, False
    audio = torch.randn(rows, 4800, generator=generator) * 0.1
    lengths = torch.tensor([4800, 0, 3000, 1700])[:rows]
    return {
        "image": torch.randn(rows, 3, image.image_size, image.image_size, generator=generator),
        "text_ids": text_ids,
        "text_mask": text_mask,
        "audio": audio * (torch.arange(4800)[None, :] < lengths[:, None]),
        "audio_lengths": lengths,
        "has_audio": lengths > 0,
        "question_ids": question_ids,
        "question_mask": question_mask,
        "answer": torch.tensor([3, 7, -1, 0])[:rows],
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
    }


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal within 1e-5 relative to the tensor's scale (fp32 sums in another order)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-6), msg=what)


def _run(config, parallel: ParallelState, sequence_parallel: bool = False) -> tuple[MultiModalTransformer, Any]:
    torch.manual_seed(0)
    model = MultiModalTransformer(config.model, parallel, sequence_parallel=sequence_parallel)
    out = model(**_batch(config))
    out.loss.backward()
    return model, out


def _tp_parity(rank: int, world: int, cases: tuple[tuple[str, bool], ...]) -> None:
    parallel = ParallelState.initialize(tensor_parallel=world)
    for kind, sequence_parallel in cases:
        config = _config(kind)
        reference, expected = _run(config, ParallelState.single())
        model, out = _run(config, parallel, sequence_parallel)
        kind = f"{kind}{' + sequence parallel' if sequence_parallel else ''}"
        assert sorted(out.losses) == sorted(OBJECTIVES), sorted(out.losses)
        _close(out.loss, expected.loss, f"{kind}: loss")
        for name, value in expected.losses.items():
            _close(out.losses[name], value, f"{kind}: {name} loss")
        for field in ("image_emb", "text_emb", "audio_emb", "vqa_logits", "itm_logits"):
            _close(out[field], expected[field], f"{kind}: {field}")
        params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            full = params[name].grad
            if getattr(param, "tensor_model_parallel", False):
                full = shard_of(full, parallel.tp_rank, world, param.partition_dim, param.partition_stride)
            assert param.grad is not None, f"{kind}: {name} got no gradient"
            _close(param.grad, full, f"{kind}: {name} gradient")


def test_whole_model_tp2_equals_one_process(tmp_path) -> None:
    """Every objective and fusion kind at TP=2, and with sequence parallelism in the encoders (their
    token sequences gathered for the fusion and the decoder): the total and per-objective losses,
    embeddings, head logits and every parameter's gradient (each rank's shard of the full one)
    equal one process's, fp32."""
    cases = (("gated", False), ("bottleneck", False), ("concat", False), ("weighted", False), ("gated", True))
    run_distributed(_tp_parity, 2, tmp_path, cases, timeout=240)


def test_every_parameter_learns_from_a_full_batch() -> None:
    """One backward pass reaches every parameter of every fusion kind (none is dead weight; the
    gated blocks' branches once their gates have opened, their gates at once), and the total is
    the weighted sum of the objectives."""
    for kind in ("gated", "bottleneck", "concat", "weighted"):
        config = _config(kind, ("model.objectives.captioning=0.5",))
        torch.manual_seed(0)
        model = MultiModalTransformer(config.model)
        out = model(**_batch(config))
        out.loss.backward()
        closed = [name for name, p in model.named_parameters() if name.endswith("_gate") and not p.grad.abs().sum() > 0]
        assert not closed, f"{kind}: closed gates get no gradient: {closed}"
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_gate"):
                    param.fill_(0.5)
        model.zero_grad()
        out = model(**_batch(config))
        out.loss.backward()
        dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"{kind}: no gradient reaches {dead}"
        weights = config.model.objectives.weights()
        expected = sum(weights[name] * loss for name, loss in out.losses.items())
        torch.testing.assert_close(out.loss, expected)


def test_missing_modalities_are_masked() -> None:
    """A row's missing audio changes neither its image-text loss terms nor the other rows'
    outputs; a pair's contrastive loss over rows with a missing side equals the loss over the
    complete rows alone; a model without a modality input runs on a placeholder."""
    config = _config()
    torch.manual_seed(0)
    model = MultiModalTransformer(config.model).eval()
    batch = _batch(config)
    with torch.no_grad():
        out = model(**batch, compute_loss=False)
        garbage = dict(batch, audio=batch["audio"].clone())
        garbage["audio"][1] = 123.0  # the row without audio: whatever it holds is ignored
        other = model(**garbage, compute_loss=False)
    for field in ("image_emb", "text_emb", "vqa_logits"):
        torch.testing.assert_close(other[field], out[field], rtol=0, atol=0)
    # the audio-text loss over rows with a missing side is the loss over the complete rows
    valid = batch["has_audio"]
    scale = torch.tensor([2.0])
    masked = contrastive_loss(out.audio_emb, out.text_emb, scale, None, valid)
    complete = contrastive_loss(out.audio_emb[valid], out.text_emb[valid], scale, None)
    torch.testing.assert_close(masked, complete)
    # no audio at all, no image at all: placeholders, masked
    no_audio = {k: v for k, v in batch.items() if not k.startswith("audio") and k != "has_audio"}
    loss = model.train()(**no_audio).loss
    assert torch.isfinite(loss)
    no_image = {k: v for k, v in batch.items() if k != "image"}
    result = model(**no_image)
    assert torch.isfinite(result.loss) and result.losses["image_text"].detach().item() == 0.0


# -- ranks on different modality sets, under ZeRO-3 --------------------------------------------------


def _mixed_modalities(rank: int, world: int, steps: int) -> None:
    from megamm.engine import build_engine, model_construction

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    config = _config(extra=("optim.warmup_steps=0",))
    parallel = ParallelState.initialize(tensor_parallel=1)
    torch.manual_seed(0)
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    with model_construction(ds_config, parallel):  # partitioned as it is built
        model = MultiModalTransformer(config.model, parallel)
    engine = build_engine(model, config.optim, 10, ds_config, parallel)
    batch = _batch(config, seed=rank)
    if rank == 0:  # image + text (+ questions): no audio in the call at all
        batch = {k: v for k, v in batch.items() if not k.startswith("audio") and k != "has_audio"}
    else:  # audio + text: no image
        batch = {k: v for k, v in batch.items() if k != "image"}
    losses = []
    for _ in range(steps):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    engine.eval()
    context = {k: batch[k] for k in ("image", "audio", "audio_lengths", "has_audio") if k in batch}
    ids = engine.module.generate(**context, max_length=8)  # each rank's own contexts; they stop together
    assert ids.shape[0] == BATCH and ids.shape[1] <= 8


def test_ranks_with_different_modalities_train_under_zero3(tmp_path) -> None:
    """Image+text on rank 0, audio+text on rank 1, ZeRO-3 with every parameter partitioned: three
    steps and a round of caption generation finish (same collectives on both ranks); a hang fails
    after 180 s."""
    run_distributed(_mixed_modalities, 2, tmp_path, 3, timeout=180)
