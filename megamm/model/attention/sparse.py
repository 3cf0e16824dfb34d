"""Sparse attention kernels: sliding-window (local) attention with global tokens, and block-sparse
attention. Neither builds a T x T score matrix or mask.

Both are *banded*: the sequence is cut into query chunks of C positions, and chunk ``b`` (queries
``b C .. b C + C - 1``) scores only the keys ``b C - L .. b C + C - 1 + R`` (a band of ``W = C + L +
R`` keys, gathered for every chunk at once by ``unfold``), under a (C, W) mask of which key each
query offset may see. The first ``G`` positions can be *global*: every query also scores them (G
more columns), and they attend to every key (G dense rows). So a head's scores take
``T (W + G) + G T`` entries: O(T (window + G)), against ``T^2`` for full attention.

- :class:`LocalAttention`: query ``i`` sees keys ``j`` with ``|i - j| <= window`` (causal:
  ``i - window <= j <= i``), C = ``chunk_size`` (default ``window / 2``), L = R = ``window``.
- :class:`BlockSparseAttention`: the sequence is cut into blocks of ``block_size``; query block
  ``b`` sees key blocks ``b - num_neighbors .. b + num_neighbors`` (causal: up to ``b``, and within
  its own block keys up to the query), plus the first ``num_global_blocks`` blocks, which see
  every block. C = ``block_size``, L = R = ``num_neighbors * block_size``.

Keys outside the sequence or padded are masked; a query with no visible key gets a zero context.
Dropout drops attention probabilities (the module draws it from the tensor-parallel stream).
Both kernels need as many queries as keys (self-attention).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megamm.model.attention.core import AttentionKernel, default_scale, dense_attention, masked_softmax, register_kernel


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    *,
    chunk: int,
    left: int,
    right: int,
    band: torch.Tensor,
    global_tokens: int,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Banded attention with global tokens (see the module docstring).

    q, k, v (B, h, T, d); key_padding_mask (B, T) or (1, T) bool or None; ``band`` (chunk, W) bool,
    W = chunk + left + right: whether the query at offset r of a chunk may see the key at offset c
    of the chunk's band (key position ``b * chunk - left + c``), already including ``causal``.
    The first ``global_tokens`` positions see and are seen by every position (subject to ``causal``
    and padding). Returns (B, h, T, d).
    """
    batch, heads, length, dim = q.shape
    blocks = -(-length // chunk)
    padded = blocks * chunk
    width = chunk + left + right
    globals_ = min(global_tokens, length)
    device = q.device

    key_valid = key_padding_mask
    if key_valid is None:
        key_valid = torch.ones(1, length, dtype=torch.bool, device=device)  # (1, T)
    band_valid = key_valid
    if globals_ > 0:  # global keys are scored in their own columns: not twice through the band
        band_valid = key_valid.clone()
        band_valid[:, :globals_] = False
    band_valid = F.pad(band_valid, (left, padded - length + right), value=False)  # (Bm, L + T' + R)
    band_valid = band_valid.unfold(1, width, chunk)  # (Bm, n, W)
    valid = band_valid[:, None, :, None, :] & band  # (Bm, 1, n, C, W)

    qb = F.pad(q * scale, (0, 0, 0, padded - length)).view(batch, heads, blocks, chunk, dim)  # (B, h, n, C, d)
    kb = F.pad(k, (0, 0, left, padded - length + right)).unfold(2, width, chunk)  # (B, h, n, d, W), a view
    vb = F.pad(v, (0, 0, left, padded - length + right)).unfold(2, width, chunk)  # (B, h, n, d, W), a view
    if globals_ > 0:  # every chunk's keys: the G global ones, then its band
        # Causal needs no mask on them: every query from G on is later than every global key, and
        # the first G queries' rows are replaced by the dense global rows below.
        kg = k[:, :, :globals_].transpose(-1, -2)[:, :, None].expand(batch, heads, blocks, dim, globals_)
        vg = v[:, :, :globals_].transpose(-1, -2)[:, :, None].expand(batch, heads, blocks, dim, globals_)
        kb, vb = torch.cat([kg, kb], dim=-1), torch.cat([vg, vb], dim=-1)  # (B, h, n, d, G + W)
        global_valid = key_valid[:, None, None, None, :globals_]  # (Bm, 1, 1, 1, G)
        valid = torch.cat([global_valid.expand(*valid.shape[:-1], globals_), valid], dim=-1)  # (Bm, 1, n, C, G + W)
    scores = torch.matmul(qb, kb)  # (B, h, n, C, G + W)
    probs, has_key = masked_softmax(scores, valid, dropout_p)
    context = torch.matmul(probs, vb.transpose(-1, -2)).masked_fill(~has_key, 0.0)  # (B, h, n, C, d)
    context = context.view(batch, heads, padded, dim)[:, :, :length]  # (B, h, T, d)

    if globals_ > 0:  # global queries see every key: G dense rows
        row_valid = key_valid[:, None, None, :]  # (Bm, 1, 1, T)
        if causal:
            past = torch.arange(length, device=device) <= torch.arange(globals_, device=device)[:, None]  # (G, T)
            row_valid = row_valid & past  # (Bm, 1, G, T)
        dense = dense_attention(q[:, :, :globals_], k, v, row_valid, scale, dropout_p)  # (B, h, G, d)
        context = torch.cat([dense, context[:, :, globals_:]], dim=2)  # (B, h, T, d)
    return context


def _band_offsets(chunk: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """(C, W) key position minus query position for each query offset r and band offset c."""
    keys = torch.arange(chunk + left + right, device=device)[None, :] - left  # (1, W)
    return keys - torch.arange(chunk, device=device)[:, None]  # (C, W)


@register_kernel("local")
class LocalAttention(AttentionKernel):
    """Sliding-window attention: query ``i`` sees keys ``|i - j| <= window`` (causal: the
    ``window`` positions before it and itself), and the first ``global_tokens`` positions see and
    are seen by all. O(T (window + global_tokens)) memory; a window >= T - 1 is full attention.

    ``chunk_size`` (default: ``window / 2``, at least 16) sets how many queries share one gathered
    band of ``chunk_size + 2 window`` keys (``chunk_size + window`` when causal): larger chunks mean
    fewer, bigger matrix products and more masked-out scores (at window 128 on 2 CPU cores, chunks
    of 64 and 128 ran alike; 32 and 256, 1.6x slower).
    """

    supports_cross = False

    def __init__(
        self, window: int, global_tokens: int = 0, chunk_size: Optional[int] = None, scale: Optional[float] = None
    ) -> None:
        super().__init__()
        if window < 0:
            raise ValueError(f"local attention: window must be >= 0, got {window}")
        if global_tokens < 0:
            raise ValueError(f"local attention: global_tokens must be >= 0, got {global_tokens}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"local attention: chunk_size must be >= 1, got {chunk_size}")
        self.window = window
        self.global_tokens = global_tokens
        self.chunk_size = chunk_size
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        self.check(q, k, v, key_padding_mask, causal)
        length = q.shape[2]
        window = min(self.window, max(length - 1, 0))  # a wider window sees nothing more
        chunk = min(self.chunk_size or max(window // 2, 16), length)
        left, right = window, 0 if causal else window
        offsets = _band_offsets(chunk, left, right, q.device)  # (C, W): key - query position
        band = (offsets >= -window) & (offsets <= (0 if causal else window))
        return banded_attention(
            q, k, v, key_padding_mask, chunk=chunk, left=left, right=right, band=band,
            global_tokens=self.global_tokens, causal=causal, scale=default_scale(q.shape[-1], self.scale),
            dropout_p=dropout_p,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"window={self.window}, global_tokens={self.global_tokens}, chunk_size={self.chunk_size}"


@register_kernel("block_sparse")
class BlockSparseAttention(AttentionKernel):
    """Block-sparse attention: blocks of ``block_size`` positions; query block ``b`` sees key blocks
    ``b - num_neighbors .. b + num_neighbors`` (causal: ``b - num_neighbors .. b``, and in block
    ``b`` only keys up to the query) and the first ``num_global_blocks`` blocks, which see every
    block. O(T block_size (2 num_neighbors + 1 + num_global_blocks)) memory; with
    ``num_neighbors`` >= the number of blocks - 1 it is full attention."""

    supports_cross = False

    def __init__(
        self, block_size: int, num_neighbors: int = 1, num_global_blocks: int = 0, scale: Optional[float] = None
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block-sparse attention: block_size must be >= 1, got {block_size}")
        if num_neighbors < 0 or num_global_blocks < 0:
            raise ValueError(
                f"block-sparse attention: num_neighbors ({num_neighbors}) and num_global_blocks "
                f"({num_global_blocks}) must be >= 0"
            )
        self.block_size = block_size
        self.num_neighbors = num_neighbors
        self.num_global_blocks = num_global_blocks
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        self.check(q, k, v, key_padding_mask, causal)
        length = q.shape[2]
        block = self.block_size
        blocks = -(-length // block)
        neighbors = min(self.num_neighbors, blocks - 1)  # more neighbours than blocks see nothing more
        left, right = neighbors * block, 0 if causal else neighbors * block
        band = torch.ones(block, block + left + right, dtype=torch.bool, device=q.device)
        if causal:
            band = _band_offsets(block, left, right, q.device) <= 0
        return banded_attention(
            q, k, v, key_padding_mask, chunk=block, left=left, right=right, band=band,
            global_tokens=self.num_global_blocks * block, causal=causal,
            scale=default_scale(q.shape[-1], self.scale), dropout_p=dropout_p,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, num_neighbors={self.num_neighbors}, "
            f"num_global_blocks={self.num_global_blocks}"
        )
