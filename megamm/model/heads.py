"""Heads on top of the encoders: projections and the CLIP-style contrastive loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.init import WeightInit
from megamm.parallel import gather_batch_with_grad, group_rank, group_size
from megamm.parallel.mappings import ProcessGroup


class Projection(nn.Module):
    """Linear map into the shared embedding space, then L2 normalisation. (B, H) -> (B, E).

    Its weight is drawn in the random stream of the piece ``"{modality}.projection"``.
    """

    def __init__(self, modality: str, hidden_size: int, embed_dim: int, init: WeightInit) -> None:
        super().__init__()
        with init.seeded(f"{modality}.projection"):
            self.linear = nn.Linear(hidden_size, embed_dim, bias=False)
            init.linear(hidden_size)(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    dp_group: ProcessGroup,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Symmetric InfoNCE whose negatives span the whole data-parallel group.

    image_emb, text_emb: (B, E) local, L2-normalised; every rank must pass the same B.
    Local rows are scored against the gathered (dp * B) rows of the other modality, with the
    positive of local row i at global index dp_rank * B + i ("local loss" with gathered
    features). The mean of this loss over ranks equals the naive loss over the global batch,
    and its gradients match once data-parallel gradients are averaged.

    ``valid`` (B,) bool: the rows that have both modalities; the others are neither anchors nor
    negatives anywhere in the group (collective: pass it on every rank or on none).
    """
    all_images = gather_batch_with_grad(image_emb, dp_group)  # (dp*B, E)
    all_texts = gather_batch_with_grad(text_emb, dp_group)  # (dp*B, E)
    batch = image_emb.shape[0]
    labels = torch.arange(batch, device=image_emb.device) + group_rank(dp_group) * batch  # (B,)
    logits_per_image = scale * image_emb @ all_texts.T  # (B, dp*B)
    logits_per_text = scale * text_emb @ all_images.T  # (B, dp*B)
    if valid is None:
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    # Pairs with a modality missing are neither anchors nor negatives. Each rank's sum over its
    # valid rows is scaled by dp / (valid rows of the whole group), so the ranks' mean is the mean
    # over the group's valid pairs (0, with a graph, when there is none).
    all_valid = gather_batch_with_grad(valid.to(image_emb.dtype)[:, None], dp_group)[:, 0] > 0  # (dp*B,)
    hidden = torch.finfo(logits_per_image.dtype).min
    logits_per_image = logits_per_image.masked_fill(~all_valid[None, :], hidden)
    logits_per_text = logits_per_text.masked_fill(~all_valid[None, :], hidden)
    per_row = F.cross_entropy(logits_per_image, labels, reduction="none") + F.cross_entropy(
        logits_per_text, labels, reduction="none"
    )  # (B,)
    total = torch.where(valid, per_row, 0.0).sum()
    return 0.5 * total * group_size(dp_group) / all_valid.sum().clamp_min(1)


CLAMP_ATTRIBUTE = "megamm_clamp"
"""A parameter carrying this attribute, ``(low, high)``, is clamped in place after every
optimizer step (``megamm.engine.clamp_parameters``), master copy included."""


class ContrastiveHead(nn.Module):
    """Learnable temperature + :func:`contrastive_loss`.

    ``logit_scale`` is clamped to ``logit_scale_max`` in place after each optimizer step, as in
    OpenCLIP; the clamp in the forward pass only covers the step between.
    """

    def __init__(self, logit_scale_init: float, logit_scale_max: float, dp_group: ProcessGroup) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init)))  # (1,): DeepSpeed rejects 0-dim
        setattr(self.logit_scale, CLAMP_ATTRIBUTE, (None, logit_scale_max))
        self.logit_scale_max = logit_scale_max
        self.dp_group = dp_group

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped: (1,)."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, E) and (B, E) of a modality pair (named image and text here); ``valid`` (B,) bool:
        the rows that have both (None: all)."""
        return contrastive_loss(image_emb, text_emb, self.scale(), self.dp_group, valid)
