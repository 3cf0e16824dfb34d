"""A plain-PyTorch CLIP built from ``torch.nn`` only: the reference megamm is measured against.

No megamm model code is used here. The architecture mirrors megamm's dual encoder at the sizes
of a megamm ``ModelConfig``: pre-norm ``nn.TransformerEncoder`` towers with GELU and no dropout,
a linear patch embedding with a class token for images, a token embedding with a masked mean
for text, learned positions, bias-free projections into the shared space, L2 normalisation and
a learnable temperature. Initialisation is PyTorch's default for every module.

Also here: the demo data decoded once into memory (:class:`InMemoryData`), so that both models
can be fed the very same batches without a loader in the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class PlainTower(nn.Module):
    """``nn.TransformerEncoder`` (pre-norm, GELU, no dropout) followed by a final LayerNorm."""

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            hidden, heads, ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=padding)  # (B, T, H)


class PlainCLIP(nn.Module):
    """image (B, 3, S, S) in [-1, 1], text ids (B, T), mask (B, T) -> normalised embeddings (B, E)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        image_hidden: int,
        image_layers: int,
        image_heads: int,
        image_ffn: int,
        vocab_size: int,
        max_length: int,
        text_hidden: int,
        text_layers: int,
        text_heads: int,
        text_ffn: int,
        embed_dim: int,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, image_hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, image_hidden))
        self.image_pos = nn.Parameter(torch.randn(1, patches + 1, image_hidden) * 0.02)
        self.image_tower = PlainTower(image_hidden, image_layers, image_heads, image_ffn)
        self.token_embed = nn.Embedding(vocab_size, text_hidden)
        self.text_pos = nn.Parameter(torch.randn(1, max_length, text_hidden) * 0.02)
        self.text_tower = PlainTower(text_hidden, text_layers, text_heads, text_ffn)
        self.image_proj = nn.Linear(image_hidden, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_scale_max = logit_scale_max

    @classmethod
    def from_megamm_config(cls, model_config: object) -> "PlainCLIP":
        """The same sizes as a megamm ``ModelConfig`` (read as plain attributes)."""
        text, image = model_config.text, model_config.image  # type: ignore[attr-defined]
        return cls(
            image_size=image.image_size,
            patch_size=image.patch_size,
            image_hidden=image.hidden_size,
            image_layers=image.num_layers,
            image_heads=image.num_heads,
            image_ffn=image.ffn_size,
            vocab_size=text.vocab_size,
            max_length=text.max_length,
            text_hidden=text.hidden_size,
            text_layers=text.num_layers,
            text_heads=text.num_heads,
            text_ffn=text.ffn_size,
            embed_dim=model_config.embed_dim,  # type: ignore[attr-defined]
            logit_scale_init=model_config.logit_scale_init,  # type: ignore[attr-defined]
            logit_scale_max=model_config.logit_scale_max,  # type: ignore[attr-defined]
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        b, c, s, _ = images.shape
        p = self.patch_size
        patches = images.reshape(b, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.patch_embed(patches)  # (B, N, H)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.image_pos  # (B, N + 1, H)
        return F.normalize(self.image_proj(self.image_tower(x)[:, 0]), dim=-1)  # (B, E)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(ids) + self.text_pos[:, : ids.shape[1]]  # (B, T, H)
        x = self.text_tower(x, padding=~mask)  # (B, T, H)
        weights = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, E)

    def clamp_logit_scale(self) -> None:
        """Bound the temperature in place after an optimizer step (OpenCLIP)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.logit_scale_max)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        image_emb, text_emb = self.encode_image(images), self.encode_text(ids, mask)
        scale = self.logit_scale.clamp(max=self.logit_scale_max).exp()
        logits = scale * image_emb @ text_emb.T  # (B, B)
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        return {"loss": loss, "image_emb": image_emb, "text_emb": text_emb}


@dataclass
class InMemoryData:
    """A decoded split: images (N, 3, S, S) float32 in [-1, 1], ids (N, T) int64, mask (N, T) bool."""

    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[index], self.ids[index], self.mask[index]

    def sequential(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)))
            yield self.batch(index)


def random_batches(size: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) sample indices drawn uniformly without replacement per batch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(size, generator=generator)[:batch_size] for _ in range(steps)])


def load_split(shards: str, tokenizer_path: str, image_size: int, max_length: int) -> InMemoryData:
    """Every usable sample of ``shards`` (a megamm shard spec), decoded into memory in file order.

    Decoding, tokenisation and the skipping of bad samples are megamm's own
    (``megamm.data.iter_eval_batches``), so both models see exactly what megamm trains on.
    """
    from megamm.config import DataConfig
    from megamm.data import Tokenizer, iter_eval_batches

    config = DataConfig(eval_shards=shards, tokenizer=tokenizer_path, image_size=image_size, max_text_length=max_length)
    batches = list(iter_eval_batches(config, Tokenizer(tokenizer_path), batch_size=1024, extras=()))  # images, captions
    return InMemoryData(
        torch.cat([b["image"] for b in batches]),  # (N, 3, S, S)
        torch.cat([b["text_ids"] for b in batches]),  # (N, T)
        torch.cat([b["text_mask"] for b in batches]),  # (N, T)
    )
