"""Recall@K against a naive per-query loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.evaluation import retrieval_metrics
from megamm.evaluation.retrieval import recall_at_k


def _naive_recall(similarity: torch.Tensor, k: int) -> float:
    hits = 0
    for query in range(similarity.shape[0]):
        order = sorted(range(similarity.shape[1]), key=lambda item: (-similarity[query, item].item(), item == query))
        hits += query in order[:k]
    return hits / similarity.shape[0]


def test_recall_matches_naive_ranking() -> None:
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(37, 37, generator=generator)
    similarity += 1.5 * torch.eye(37)
    got = recall_at_k(similarity, (1, 5, 10))
    for k in (1, 5, 10):
        assert abs(got[k] - _naive_recall(similarity, k)) < 1e-6


def test_ties_count_against_the_query() -> None:
    assert recall_at_k(torch.ones(4, 4), (1, 4)) == {1: 0.0, 4: 1.0}


def test_perfect_and_shuffled_embeddings() -> None:
    embeddings = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    perfect = retrieval_metrics(embeddings, embeddings)
    assert perfect["text_to_image_R@1"] == 1.0 and perfect["image_to_text_R@1"] == 1.0
    shifted = retrieval_metrics(embeddings, embeddings.roll(1, dims=0), ks=(1,))
    assert shifted["text_to_image_R@1"] == 0.0


def test_non_finite_scores_are_misses() -> None:
    # A diverged model (say an fp16 overflow) gives NaN embeddings; they used to score R@1 = 1.0.
    nan = torch.full((6, 4), float("nan"))
    assert retrieval_metrics(nan, nan, ks=(1, 5)) == {
        "text_to_image_R@1": 0.0, "text_to_image_R@5": 0.0, "image_to_text_R@1": 0.0, "image_to_text_R@5": 0.0,
    }
    similarity = 2.0 * torch.eye(5)
    similarity[0, 0] = float("inf")  # an infinite match: no real score, a miss
    similarity[1, 1] = float("-inf")
    similarity[2, 4] = float("nan")  # a NaN item outranks query 2's real match
    assert recall_at_k(similarity, (1, 2, 5)) == pytest.approx({1: 0.4, 2: 0.6, 5: 0.6})


def test_chunked_scoring_equals_the_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    from megamm.evaluation import retrieval

    generator = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(50, 8, generator=generator), dim=-1)
    full = retrieval_metrics(images, texts)
    assert full == {
        **{f"text_to_image_R@{k}": v for k, v in recall_at_k(texts @ images.T, (1, 5, 10)).items()},
        **{f"image_to_text_R@{k}": v for k, v in recall_at_k(images @ texts.T, (1, 5, 10)).items()},
    }
    monkeypatch.setattr(retrieval, "QUERY_CHUNK", 7)  # 50 queries in 8 chunks, the last one short
    assert retrieval_metrics(images, texts) == full
