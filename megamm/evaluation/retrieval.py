"""Cross-modal retrieval recall@K."""

from __future__ import annotations

from typing import Sequence

import torch

QUERY_CHUNK = 4096
"""Queries scored at a time: memory is QUERY_CHUNK x N similarities, not N x N."""


def _match_ranks(similarity: torch.Tensor, offset: int) -> torch.Tensor:
    """similarity (q, N): row r's match is item ``offset + r``. Returns each match's rank (q,), 0 = first.

    Ties count against the query: the rank is the number of items scoring strictly higher,
    plus the number of other items scoring equal. Non-finite scores count against it too: a
    match scoring NaN or +-inf gets rank N (a miss at every k), and an item scoring NaN ranks
    above the match.
    """
    rows, items = similarity.shape
    index = torch.arange(rows, device=similarity.device)
    positives = similarity[index, index + offset].unsqueeze(1)  # (q, 1)
    scores = similarity.nan_to_num(nan=float("inf"))  # (q, N) a NaN item outranks every real match
    higher = (scores > positives).sum(dim=1)
    ties = (scores == positives).sum(dim=1) - 1
    rank = higher + ties  # (q,)
    return rank.masked_fill(~torch.isfinite(positives.squeeze(1)), items)


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """similarity (Q, N): query i's match is item i. Returns {k: fraction of queries whose match ranks < k}.

    See :func:`_match_ranks` for ties and non-finite scores: a diverged model scores near
    zero, never 1.0.
    """
    queries, items = similarity.shape
    if queries != items:
        raise ValueError(f"expected one match per query, got a {queries}x{items} similarity matrix")
    rank = _match_ranks(similarity, 0)
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("image", "text"),
) -> dict[str, float]:
    """Text->image and image->text recall@K for paired, L2-normalised embeddings (N, E).

    ``names``: what the two sides are called in the keys (``"text_to_image_R@1"``; for another
    pair, e.g. ``("audio", "text")``: ``"text_to_audio_R@1"``, ``"audio_to_text_R@1"``). Scored
    QUERY_CHUNK queries at a time, so an evaluation set of any size fits in memory.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"expected paired embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    images, texts = image_emb.float(), text_emb.float()
    metrics = {}
    first, second = names
    for name, queries, items in ((f"{second}_to_{first}", texts, images), (f"{first}_to_{second}", images, texts)):
        chunks = range(0, len(queries), QUERY_CHUNK)
        ranks = torch.cat([_match_ranks(queries[i : i + QUERY_CHUNK] @ items.T, i) for i in chunks])  # (N,)
        for k in ks:
            metrics[f"{name}_R@{k}"] = (ranks < k).float().mean().item()
    return metrics
