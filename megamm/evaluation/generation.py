"""Scores of generated text: corpus BLEU-4 of captions (sacrebleu) and VQA accuracy."""

from __future__ import annotations

from typing import Sequence


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: how answers are compared."""
    return " ".join(text.lower().strip().strip(".?!").split())


def caption_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 100] of ``hypotheses`` against one reference each, with sacrebleu's
    standard settings (13a tokenisation, exponential smoothing off), as reported in papers."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references: give one reference each")
    if not hypotheses:
        raise ValueError("no captions to score")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def answer_accuracy(predicted: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of predicted answers equal to the true ones after :func:`normalize_answer`."""
    if len(predicted) != len(answers):
        raise ValueError(f"{len(predicted)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predicted, answers)) / len(answers)


__all__ = ["answer_accuracy", "caption_bleu", "normalize_answer"]
