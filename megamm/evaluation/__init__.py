"""Evaluation metrics (pure functions over embeddings / predictions)."""

from megamm.evaluation.generation import answer_accuracy, caption_bleu, normalize_answer
from megamm.evaluation.retrieval import retrieval_metrics

__all__ = ["answer_accuracy", "caption_bleu", "normalize_answer", "retrieval_metrics"]
