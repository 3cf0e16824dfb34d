"""Evaluation metrics (pure functions over embeddings / predictions)."""

from megamm.evaluation.retrieval import retrieval_metrics

__all__ = ["retrieval_metrics"]
