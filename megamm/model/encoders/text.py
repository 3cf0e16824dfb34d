"""Text encoder: SentencePiece ids -> vocabulary-parallel embedding -> transformer -> pooled."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from megamm.model.blocks import BlockAttention, EncoderOutput, SequenceLayout, TransformerStack, hidden_dropout
from megamm.model.init import WeightInit
from megamm.parallel import VocabParallelEmbedding, reduce_from_group
from megamm.parallel.mappings import ProcessGroup


def masked_mean(features: torch.Tensor, mask: torch.Tensor, layout: Optional[SequenceLayout] = None) -> torch.Tensor:
    """Mean over real tokens. features (B, T, H), mask (B, T) bool -> (B, H).

    Under sequence parallelism (``layout.active``) ``features`` is this rank's slice (B, T / tp, H)
    and ``mask`` the whole (padded) sequence's (B, T): each rank sums its slice's real tokens, the
    group sums the parts (their gradient reaches every slice), and the result is alike on every rank.
    """
    if layout is None or not layout.active:
        weights = mask.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
        return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    count = mask.to(features.dtype).sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1), the whole sequence
    weights = layout.local(mask).to(features.dtype).unsqueeze(-1)  # (B, T / tp, 1)
    return reduce_from_group((features * weights).sum(dim=1), layout.group) / count  # (B, H)


class TextEmbedding(nn.Module):
    """Vocabulary-parallel token embedding + learned positions, then ``dropout`` (in training).
    ids (B, T) -> (B, T, H); under sequence parallelism (``sequence_parallel`` at tp > 1) this rank's
    slice (B, T' / tp, H) of the sequence zero-padded to T', a multiple of tp (pad the key padding
    mask alike with ``layout.pad_mask``).

    Its weights are drawn in the random stream of the piece ``"text.embedding"``. Without
    ``learned_positions`` (rotary positions in the attention layers instead) it has no position
    embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        hidden_size: int,
        group: ProcessGroup,
        init: WeightInit,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        learned_positions: bool = True,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.layout = SequenceLayout(group, sequence_parallel)
        self.dropout = dropout
        with init.seeded("text.embedding"):
            self.token_embedding = VocabParallelEmbedding(
                vocab_size, hidden_size, group, init_method=init.token_embedding()
            )
            self.position_embedding: Optional[nn.Parameter] = None
            if learned_positions:
                self.position_embedding = nn.Parameter(torch.empty(max_length, hidden_size))
                init.position()(self.position_embedding)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"text length {length} exceeds model.text.max_length={self.max_length}")
        if self.layout.active:  # as Megatron: the partial lookups reduce-scattered straight into the slices
            x = self.layout.reduce_scatter(self.token_embedding.partial(ids))  # (B, T' / tp, H)
        else:
            x = self.token_embedding(ids)  # (B, T, H)
        if self.position_embedding is not None:
            x = x + self.layout.scatter(self.position_embedding[:length].unsqueeze(0))  # + (1, T or T' / tp, H)
        return hidden_dropout(x, self.dropout, self.training, self.layout)  # (B, T' / tp, H) under SP


class TextEncoder(nn.Module):
    """Transformer over caption tokens, mean-pooled over non-padding tokens. Bidirectional unless
    ``attention`` (a :class:`~megamm.model.blocks.BlockAttention` for every block, or one per block)
    says causal; ``learned_positions=False`` with rotary attention (``BlockAttention.rotary``)."""

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
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention: Union[BlockAttention, Sequence[BlockAttention], None] = None,
        learned_positions: bool = True,
    ) -> None:
        super().__init__()
        self.embedding = TextEmbedding(
            vocab_size, max_length, hidden_size, group, init, sequence_parallel, dropout, learned_positions
        )
        self.transformer = TransformerStack(
            "text", hidden_size, num_layers, num_heads, ffn_size, group, init, sequence_parallel, dropout,
            attention_dropout, attention,
        )  # fmt: skip

    def features(self, ids: torch.Tensor, mask: torch.Tensor, tokens: bool = False) -> EncoderOutput:
        """ids (B, T) int64, mask (B, T) bool (True = real token) -> the mean over real tokens
        (B, H) and, with ``tokens``, every token's features (B, T, H) with ``mask``."""
        layout = self.embedding.layout
        padded = layout.pad_mask(mask)  # (B, T'), T' = T without sequence parallelism
        x = self.transformer(self.embedding(ids), key_padding_mask=padded)  # (B, T, H), or (B, T' / tp, H)
        pooled = masked_mean(x, padded, layout)  # (B, H)
        if not tokens:
            return EncoderOutput(pooled)
        return EncoderOutput(pooled, layout.gather(x, ids.shape[1]), mask)  # (B, H), (B, T, H), (B, T)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64, mask (B, T) bool (True = real token) -> (B, H)."""
        return self.features(ids, mask).pooled
