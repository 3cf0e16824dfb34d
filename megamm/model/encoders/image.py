"""Image encoder: a ViT over non-overlapping patches with a class token."""

from __future__ import annotations

import torch
from torch import nn

from megamm.model.blocks import TransformerStack
from megamm.model.init import WeightInit
from megamm.parallel.mappings import ProcessGroup


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * P * P) with N = (H / P) * (W / P), row-major patches."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
    return x.reshape(batch, (height // p) * (width // p), channels * p * p)


class ImagePatchEmbedding(nn.Module):
    """Linear patch embedding + class token + learned positions. (B, C, S, S) -> (B, N + 1, H).

    Its weights are drawn in the random stream of the piece ``"image.embedding"``.
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, hidden_size: int, init: WeightInit) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
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
        return torch.cat([cls, x], dim=1) + self.position_embedding  # (B, N + 1, H)


def pool_class_token(features: torch.Tensor) -> torch.Tensor:
    """The class token's features. (B, N + 1, H) -> (B, H)."""
    return features[:, 0]


class ImageEncoder(nn.Module):
    """:class:`ImagePatchEmbedding` + transformer; pools the class token."""

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
    ) -> None:
        super().__init__()
        self.embedding = ImagePatchEmbedding(image_size, patch_size, channels, hidden_size, init)
        self.transformer = TransformerStack("image", hidden_size, num_layers, num_heads, ffn_size, group, init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) -> (B, H)."""
        return pool_class_token(self.transformer(self.embedding(images)))  # (B, H)
