"""Image encoder: a ViT over non-overlapping patches with a class token."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.blocks import BlockAttention, EncoderOutput, SequenceLayout, TransformerStack, hidden_dropout
from megamm.model.init import WeightInit
from megamm.parallel import group_rank, reduce_from_group
from megamm.parallel.mappings import ProcessGroup

log = logging.getLogger(__name__)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * P * P) with N = (H / P) * (W / P), row-major patches."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
    return x.reshape(batch, (height // p) * (width // p), channels * p * p)


def interpolate_position_embedding(positions: torch.Tensor, num_tokens: int, mode: str = "bicubic") -> torch.Tensor:
    """Learned positions of a square patch grid, resized to another grid: (1 + g * g, H) ->
    (num_tokens, H), num_tokens = 1 + G * G. The class token's position (row 0) is kept; the grid's
    are interpolated as an image (``F.interpolate``, ``align_corners=False``: patch centres at
    (i + 0.5) / g), bicubic by default as for ViT and CLIP checkpoints fine-tuned at another
    resolution. Computed in float32 or wider, returned in ``positions``' dtype."""
    old_grid, new_grid = _grid_side(positions.shape[0]), _grid_side(num_tokens)
    if old_grid is None or new_grid is None:
        raise ValueError(
            f"position embeddings of {positions.shape[0]} and {num_tokens} tokens are not a class token "
            "plus a square patch grid; only square images (model.image.image_size) can be resized"
        )
    if old_grid == new_grid:
        return positions
    compute = positions.float() if positions.dtype in (torch.float16, torch.bfloat16) else positions
    grid = compute[1:].reshape(old_grid, old_grid, -1).permute(2, 0, 1)[None]  # (1, H, g, g)
    resized = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, align_corners=False)  # (1, H, G, G)
    resized = resized[0].permute(1, 2, 0).reshape(new_grid * new_grid, -1)  # (G * G, H)
    return torch.cat([compute[:1], resized]).to(positions.dtype)  # (1 + G * G, H)


def _grid_side(num_tokens: int) -> Optional[int]:
    side = math.isqrt(num_tokens - 1) if num_tokens > 1 else 0
    return side if side > 0 and side * side == num_tokens - 1 else None


class ImagePatchEmbedding(nn.Module):
    """Linear patch embedding + class token + learned positions, then ``dropout`` (in training).
    (B, C, S, S) -> (B, N + 1, H); under sequence parallelism (``sequence_parallel`` at tp > 1) this
    rank's slice (B, T' / tp, H) of the N + 1 tokens zero-padded to T', a multiple of tp, whose
    padding :meth:`key_padding_mask` hides from attention.

    Its weights are drawn in the random stream of the piece ``"image.embedding"``.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        hidden_size: int,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.layout = SequenceLayout(group, sequence_parallel)
        self.dropout = dropout
        num_patches = (image_size // patch_size) ** 2
        self.num_tokens = num_patches + 1
        patch_features = channels * patch_size * patch_size
        with init.seeded("image.embedding"):
            self.patch_embedding = nn.Linear(patch_features, hidden_size)
            init.linear(patch_features)(self.patch_embedding.weight)
            nn.init.zeros_(self.patch_embedding.bias)
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            self.position_embedding = nn.Parameter(torch.empty(num_patches + 1, hidden_size))
            init.position()(self.position_embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, model.image.image_size is {size}")
        patches = patchify(images.to(self.patch_embedding.weight.dtype), self.patch_size)  # (B, N, C*P*P)
        x = self.patch_embedding(patches)  # (B, N, H)
        cls = self.class_token.expand(x.shape[0], -1, -1)  # (B, 1, H)
        x = torch.cat([cls, x], dim=1) + self.position_embedding  # (B, N + 1, H)
        x = self.layout.scatter(x)  # (B, T' / tp, H) under sequence parallelism
        return hidden_dropout(x, self.dropout, self.training, self.layout)

    def adapt_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Make weights trained at another image size (a patch grid of another side) fit: their
        position embeddings are resized in ``state_dict`` to this model's grid
        (:func:`interpolate_position_embedding`). Called on loading, by ``load_state_dict`` and by
        the engine's partitioned (ZeRO-3) loader alike."""
        key = prefix + "position_embedding"
        saved = state_dict.get(key)
        hidden = self.patch_embedding.out_features
        if saved is None or saved.dim() != 2 or saved.shape[1] != hidden or saved.shape[0] == self.num_tokens:
            # Nothing to do; or not a resolution change, which the shape check reports; or a ZeRO-3
            # placeholder (DeepSpeed's own loading passes the empty partitioned tensors).
            return
        side = _grid_side(self.num_tokens)
        log.info("%s: %d saved positions resized to a %d x %d patch grid", key, saved.shape[0] - 1, side, side)
        state_dict[key] = interpolate_position_embedding(saved, self.num_tokens)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.adapt_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def key_padding_mask(self, device: torch.device) -> Optional[torch.Tensor]:
        """(1, T') bool, False at the padding that sequence parallelism adds; None without padding."""
        return self.layout.padding_mask(self.num_tokens, device)


def pool_class_token(features: torch.Tensor, layout: Optional[SequenceLayout] = None) -> torch.Tensor:
    """The class token's features. (B, N + 1, H) -> (B, H), alike on every rank.

    Under sequence parallelism (``layout.active``) ``features`` is this rank's slice (B, T' / tp, H)
    and the class token, position 0, lies in the first rank's: the group sums every rank's first
    position, the others' times zero. Every rank's result thus depends on its own slice, so every
    rank's backward pass runs through its blocks and joins the collectives there; the gradient
    reaches the first rank's class token only.
    """
    if layout is None or not layout.active:
        return features[:, 0]
    own = features[:, 0] * (1.0 if group_rank(layout.group) == 0 else 0.0)  # (B, H)
    return reduce_from_group(own, layout.group)


class ImageEncoder(nn.Module):
    """:class:`ImagePatchEmbedding` + transformer; pools the class token. ``attention``: the blocks'
    kernels (:class:`~megamm.model.blocks.BlockAttention`, one for all or one per block)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention: Union[BlockAttention, Sequence[BlockAttention], None] = None,
    ) -> None:
        super().__init__()
        self.embedding = ImagePatchEmbedding(
            image_size, patch_size, channels, hidden_size, init, group, sequence_parallel, dropout
        )
        self.transformer = TransformerStack(
            "image", hidden_size, num_layers, num_heads, ffn_size, group, init, sequence_parallel, dropout,
            attention_dropout, attention,
        )  # fmt: skip

    def features(self, images: torch.Tensor, tokens: bool = False) -> EncoderOutput:
        """images (B, C, S, S) -> the class token's features (B, H) and, with ``tokens``, every
        token's (B, N + 1, H) (no padding: no mask)."""
        x = self.embedding(images)  # (B, N + 1, H), or this rank's (B, T' / tp, H) under sequence parallelism
        x = self.transformer(x, self.embedding.key_padding_mask(x.device))
        pooled = pool_class_token(x, self.embedding.layout)  # (B, H)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, self.embedding.layout.gather(x, self.embedding.num_tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) -> (B, H)."""
        return self.features(images).pooled
