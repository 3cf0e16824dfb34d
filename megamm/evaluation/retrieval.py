"""Cross-modal retrieval recall@K."""

from __future__ import annotations

from typing import Sequence

import torch


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """similarity (Q, N): query i's match is item i. Returns {k: fraction of queries whose match ranks < k}.

    Ties count against the query: the rank of the match is the number of items scoring
    strictly higher, plus the number of other items scoring equal.
    """
    queries, items = similarity.shape
    if queries != items:
        raise ValueError(f"expected one match per query, got a {queries}x{items} similarity matrix")
    positives = similarity.diagonal().unsqueeze(1)  # (Q, 1)
    higher = (similarity > positives).sum(dim=1)
    ties = (similarity == positives).sum(dim=1) - 1
    rank = higher + ties  # (Q,) 0 = first
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text->image and image->text recall@K for paired, L2-normalised embeddings (N, E)."""
    similarity = text_emb.float() @ image_emb.float().T  # (N_text, N_image)
    metrics = {}
    for k, value in recall_at_k(similarity, ks).items():
        metrics[f"text_to_image_R@{k}"] = value
    for k, value in recall_at_k(similarity.T, ks).items():
        metrics[f"image_to_text_R@{k}"] = value
    return metrics
