"""Text encoder: SentencePiece ids -> vocabulary-parallel embedding -> transformer -> pooled."""

from __future__ import annotations

import torch
from torch import nn

from megamm.model.blocks import TransformerStack
from megamm.model.init import WeightInit
from megamm.parallel import VocabParallelEmbedding
from megamm.parallel.mappings import ProcessGroup


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. features (B, T, H), mask (B, T) bool -> (B, H)."""
    weights = mask.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
    return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TextEmbedding(nn.Module):
    """Vocabulary-parallel token embedding + learned positions. ids (B, T) -> (B, T, H).

    Its weights are drawn in the random stream of the piece ``"text.embedding"``.
    """

    def __init__(self, vocab_size: int, max_length: int, hidden_size: int, group: ProcessGroup, init: WeightInit) -> None:
        super().__init__()
        self.max_length = max_length
        with init.seeded("text.embedding"):
            self.token_embedding = VocabParallelEmbedding(
                vocab_size, hidden_size, group, init_method=init.token_embedding()
            )
            self.position_embedding = nn.Parameter(torch.empty(max_length, hidden_size))
            init.position()(self.position_embedding)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"text length {length} exceeds model.text.max_length={self.max_length}")
        return self.token_embedding(ids) + self.position_embedding[:length]  # (B, T, H)


class TextEncoder(nn.Module):
    """Bidirectional transformer over caption tokens, mean-pooled over non-padding tokens."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
    ) -> None:
        super().__init__()
        self.embedding = TextEmbedding(vocab_size, max_length, hidden_size, group, init)
        self.transformer = TransformerStack("text", hidden_size, num_layers, num_heads, ffn_size, group, init)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64, mask (B, T) bool (True = real token) -> (B, H)."""
        x = self.transformer(self.embedding(ids), key_padding_mask=mask)  # (B, T, H)
        return masked_mean(x, mask)  # (B, H)
