"""Heads on top of the encoders: projections and the CLIP-style contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.init import WeightInit
from megamm.parallel import gather_batch_with_grad, group_rank
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
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, dp_group: ProcessGroup
) -> torch.Tensor:
    """Symmetric InfoNCE whose negatives span the whole data-parallel group.

    image_emb, text_emb: (B, E) local, L2-normalised; every rank must pass the same B.
    Local rows are scored against the gathered (dp * B) rows of the other modality, with the
    positive of local row i at global index dp_rank * B + i ("local loss" with gathered
    features). The mean of this loss over ranks equals the naive loss over the global batch,
    and its gradients match once data-parallel gradients are averaged.
    """
    all_images = gather_batch_with_grad(image_emb, dp_group)  # (dp*B, E)
    all_texts = gather_batch_with_grad(text_emb, dp_group)  # (dp*B, E)
    batch = image_emb.shape[0]
    labels = torch.arange(batch, device=image_emb.device) + group_rank(dp_group) * batch  # (B,)
    logits_per_image = scale * image_emb @ all_texts.T  # (B, dp*B)
    logits_per_text = scale * text_emb @ all_images.T  # (B, dp*B)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


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

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=self.logit_scale_max).exp()
        return contrastive_loss(image_emb, text_emb, scale, self.dp_group)
