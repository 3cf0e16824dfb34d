"""Objectives on fused image-text features: image-text matching (ITM) with hard negatives, and
visual question answering, classified (:class:`VQAClassifier`) or generated (:func:`answer_loss`,
through :class:`~megamm.model.decoder.TextDecoder`).

ITM (as ALBEF and BLIP train it): each image of the batch is paired with its own caption
(label 1) and with a hard negative caption (label 0), each caption with a hard negative image
(label 0). The negatives are sampled from the softmax of the contrastive similarities with the
positive left out (:func:`mine_hard_negatives`), so captions the model confuses with the true one
are drawn most often; the fusion encoder then scores the 3B pairs and a two-way classifier reads
their pooled features.

The heads' matrices are tensor-parallel (column-parallel up, row-parallel down: the logits come
out whole on every rank, alike), drawn under :meth:`~megamm.model.init.WeightInit.seeded` in the
pieces ``"{name}.head"``, so any tensor-parallel size gives the tp = 1 model split up.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamm.model.decoder import TextDecoder
from megamm.model.init import WeightInit
from megamm.parallel import ColumnParallelLinear, RowParallelLinear, group_size
from megamm.parallel.mappings import ProcessGroup

NO_ANSWER = -1
"""``answer`` of a sample without a (known) answer: it counts for nothing in the VQA loss."""

FusePairs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fuse(image_index (N,), text_index (N,)) -> pooled fused features (N, H)`` of those pairs."""


def mine_hard_negatives(
    similarity: torch.Tensor, generator: Optional[torch.Generator] = None, group: ProcessGroup = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a hard negative for every image and every text of a batch.

    Args:
        similarity: (B, B), image i against text j (the contrastive logits, temperature
            included), positives on the diagonal; B >= 2. Read without gradient.
        generator: the random stream of the sampling (fixed generator: fixed negatives); on the
            similarity's device or the CPU.
        group: the tensor-parallel group, whose ranks must fuse the same pairs: its first rank's
            choice is broadcast to the others.

    Returns:
        ``(text_for_image, image_for_text)``, both (B,) int64: for image i a text j != i drawn
        with probability softmax over j != i of ``similarity[i, j]``; for text j an image i != j
        drawn from softmax over i != j of ``similarity[i, j]`` (ALBEF's sampling).
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"mine_hard_negatives: similarity must be square (B, B), got {tuple(similarity.shape)}")
    batch = similarity.shape[0]
    if batch < 2:
        raise ValueError(f"mine_hard_negatives: a batch of {batch} has no negative; use a batch of at least 2")
    with torch.no_grad():
        device = generator.device if generator is not None else similarity.device
        scores = similarity.detach().to(device=device, dtype=torch.float32)  # (B, B)
        positive = torch.eye(batch, dtype=torch.bool, device=device)
        text_weights = torch.softmax(scores.masked_fill(positive, float("-inf")), dim=1)  # (B, B): row = image
        image_weights = torch.softmax(scores.T.masked_fill(positive, float("-inf")), dim=1)  # (B, B): row = text
        text_for_image = torch.multinomial(text_weights, 1, generator=generator).squeeze(1)  # (B,)
        image_for_text = torch.multinomial(image_weights, 1, generator=generator).squeeze(1)  # (B,)
        negatives = torch.stack([text_for_image, image_for_text]).to(similarity.device)  # (2, B)
        if group_size(group) > 1:
            dist.broadcast(negatives, src=dist.get_global_rank(group, 0), group=group)
    return negatives[0], negatives[1]


def batch_generator(ids: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by a batch's token ids (B, T): the hard negatives a batch draws depend
    on the batch alone, so they are the same in every parallel layout and form (the pipeline's
    stages consume the global random stream differently) and after any resume."""
    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # (T,)
    checksum = int(((ids.long() % 1_000_003) * weights).sum().item())
    return torch.Generator(device="cpu").manual_seed(checksum % (2**63 - 1))


MASKED_SIMILARITY = -1e4
"""The similarity given to a pair with a missing side: such a row is drawn as a negative only
when no other row is left."""


def matching_pairs(
    similarity: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    group: ProcessGroup = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 3B (image, text) pairs the matching loss scores: the B positives (i, i), then each
    image with its hard negative text, then each text with its hard negative image
    (:func:`mine_hard_negatives` over ``similarity`` (B, B)).

    ``valid`` (B,) bool: the rows that have both an image and a text (None: all); the others are
    masked out of the similarities. Returns ``(images (3B,), texts (3B,), weight (3B,) bool)``,
    ``weight`` marking the pairs whose both sides exist.
    """
    batch = similarity.shape[0]
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=similarity.device)
    else:
        masked = similarity.detach().masked_fill(~valid[None, :], MASKED_SIMILARITY)
        similarity = masked.masked_fill(~valid[:, None], MASKED_SIMILARITY)  # (B, B)
    text_for_image, image_for_text = mine_hard_negatives(similarity, generator, group)
    index = torch.arange(batch, device=text_for_image.device)  # (B,)
    images = torch.cat([index, index, image_for_text])  # (3B,)
    texts = torch.cat([index, text_for_image, index])  # (3B,)
    return images, texts, valid[images] & valid[texts]


class _ParallelMLPHead(nn.Module):
    """Column-parallel ``hidden -> inner``, GELU, row-parallel ``inner -> outputs``: (N, H) -> (N, outputs),
    whole and alike on every rank. Weights drawn in the piece ``"{name}.head"``."""

    def __init__(
        self, name: str, hidden_size: int, inner_size: int, outputs: int, group: ProcessGroup, init: WeightInit
    ) -> None:
        super().__init__()
        if inner_size % group_size(group) != 0:
            raise ValueError(
                f"{name} head: inner size {inner_size} is not divisible by the tensor-parallel size "
                f"{group_size(group)}; pick a multiple of it"
            )
        with init.seeded(f"{name}.head"):
            self.dense = ColumnParallelLinear(hidden_size, inner_size, group, init_method=init.linear(hidden_size))
            self.out = RowParallelLinear(inner_size, outputs, group, init_method=init.linear(inner_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.dense(x)))  # (N, H) -> (N, inner / tp) -> (N, outputs)


class ImageTextMatchingHead(nn.Module):
    """Binary classifier (does the caption describe the image?) over pooled fused pair features.

    ``head(pooled)``: (N, H) -> logits (N, 2), class 1 = match. :meth:`loss` scores positives
    against negatives; :meth:`matching_loss` mines the negatives, fuses the pairs through the
    caller's fusion encoder and returns the ITM loss. ``inner_size`` (default H) is the width of
    the column-parallel hidden layer.
    """

    mine_hard_negatives = staticmethod(mine_hard_negatives)

    def __init__(
        self,
        hidden_size: int,
        group: ProcessGroup,
        init: WeightInit,
        inner_size: Optional[int] = None,
        name: str = "itm",
    ) -> None:
        super().__init__()
        self.group = group
        self.mlp = _ParallelMLPHead(name, hidden_size, inner_size or hidden_size, 2, group, init)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (N, H) -> match logits (N, 2)."""
        return self.mlp(pooled)

    def loss(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Cross entropy of the match / no-match decision, averaged over every pair:
        positive (P, H) pooled features of matching pairs (label 1), negative (M, H) of
        mismatched ones (label 0)."""
        if positive.shape[1:] != negative.shape[1:]:
            raise ValueError(
                f"ImageTextMatchingHead.loss: positive {tuple(positive.shape)} and negative "
                f"{tuple(negative.shape)} features must have the same width"
            )
        logits = self(torch.cat([positive, negative]))  # (P + M, 2)
        labels = torch.cat(
            [
                torch.ones(positive.shape[0], dtype=torch.long, device=logits.device),
                torch.zeros(negative.shape[0], dtype=torch.long, device=logits.device),
            ]
        )  # (P + M,)
        return F.cross_entropy(logits.float(), labels)

    def pairs_loss(self, pooled: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The matching loss of :func:`matching_pairs`' 3B rows: ``pooled`` (3B, H) (the B positives
        first, label 1; the negatives label 0), ``weight`` (3B,) bool (the pairs that count) ->
        (cross entropy averaged over the counted pairs (0 with a graph if none), logits (3B, 2))."""
        logits = self(pooled).float()  # (3B, 2)
        rows = logits.shape[0]
        labels = (torch.arange(rows, device=logits.device) < rows // 3).long()  # (3B,): 1 for the positives
        counted = weight.to(logits.dtype)  # (3B,)
        losses = F.cross_entropy(logits, labels, reduction="none")  # (3B,)
        return (losses * counted).sum() / counted.sum().clamp_min(1), logits

    def matching_loss(
        self, fuse: FusePairs, similarity: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """The ITM loss of a batch of B matching pairs.

        ``similarity`` (B, B): the contrastive logits, image i against text j (see
        :func:`mine_hard_negatives`). ``fuse(image_index, text_index)`` returns the pooled fused
        features (3B, H) of the pairs asked for: the B positives (i, i), then each image with its
        hard negative text, then each text with its hard negative image.
        """
        images, texts, _ = matching_pairs(similarity, generator=generator, group=self.group)
        pooled = fuse(images, texts)  # (3B, H)
        if pooled.shape[0] != images.shape[0]:
            raise ValueError(
                f"ImageTextMatchingHead.matching_loss: fuse returned {pooled.shape[0]} rows for {images.shape[0]} pairs"
            )
        batch = similarity.shape[0]
        return self.loss(pooled[:batch], pooled[batch:])


class VQAClassifier(nn.Module):
    """Visual question answering as classification over an answer vocabulary.

    ``head(pooled)``: fused (image + question) features (B, H) -> answer logits (B, num_answers),
    through a column-parallel ``H -> inner`` layer (default 2H), GELU, and a row-parallel
    ``inner -> num_answers`` layer (any number of answers at any tensor-parallel size).
    :meth:`loss`: cross entropy over the samples with an answer (``answer`` != -1).
    """

    def __init__(
        self,
        hidden_size: int,
        num_answers: int,
        group: ProcessGroup,
        init: WeightInit,
        inner_size: Optional[int] = None,
        name: str = "vqa",
    ) -> None:
        super().__init__()
        if num_answers < 2:
            raise ValueError(f"VQAClassifier: num_answers={num_answers} must be at least 2")
        self.num_answers = num_answers
        self.mlp = _ParallelMLPHead(name, hidden_size, inner_size or 2 * hidden_size, num_answers, group, init)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, H) -> answer logits (B, num_answers)."""
        return self.mlp(pooled)

    def loss(
        self, pooled: torch.Tensor, answer: torch.Tensor, return_logits: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Mean cross entropy over the samples whose ``answer`` (B,) int64 is not -1; a batch with
        no answer gives 0 (finite, with a graph reaching the head's weights). With
        ``return_logits`` also the answer logits (B, num_answers) it scored."""
        if answer.shape != pooled.shape[:1]:
            raise ValueError(
                f"VQAClassifier.loss: answer must be (B,) = ({pooled.shape[0]},), got {tuple(answer.shape)}"
            )
        torch._assert_async(
            ((answer >= NO_ANSWER) & (answer < self.num_answers)).all(),
            f"VQAClassifier.loss: answers must be -1 (none) or in [0, {self.num_answers}); "
            "check the answer vocabulary against num_answers",
        )
        logits = self(pooled)  # (B, A)
        total = F.cross_entropy(logits.float(), answer, ignore_index=NO_ANSWER, reduction="sum")
        loss = total / (answer != NO_ANSWER).sum().clamp_min(1)
        return (loss, logits) if return_logits else loss


def answer_loss(
    decoder: TextDecoder,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    context: torch.Tensor,
    context_mask: Optional[torch.Tensor] = None,
    label_smoothing: Optional[float] = None,
) -> torch.Tensor:
    """Generative VQA: the decoder's teacher-forced loss (:meth:`TextDecoder.loss`) on the answers
    (B, T) (BOS answer EOS, padded; a sample without a question has an all-False ``answer_mask``
    and counts for nothing) given the fused image + question ``context`` (B, Tk, Hc). Generate
    answers with ``decoder.generate(context, context_mask, ...)``."""
    return decoder.loss(answer_ids, answer_mask, context, context_mask, label_smoothing=label_smoothing)


__all__ = [
    "ImageTextMatchingHead",
    "MASKED_SIMILARITY",
    "NO_ANSWER",
    "VQAClassifier",
    "answer_loss",
    "batch_generator",
    "matching_pairs",
    "mine_hard_negatives",
]
