"""Rotary position embedding (RoPE, Su et al., 2021) for self-attention.

Each pair of channels ``(x_c, x_{c + d/2})`` of a query or key at position ``t`` is rotated by the
angle ``t * base^(-2c / d)`` (GPT-NeoX's half-split layout), so that the score ``q_s . k_t`` after
rotation depends on the positions only through ``s - t``. It acts on every head alike, so it is
the same at every tensor-parallel size. It holds no tensors at all: the angles are computed in
float64 at each call (T x d / 2 numbers) on the input's device, so nothing is in checkpoints, and
nothing is rounded by a build under DeepSpeed's ``zero.Init`` (which casts floating tensors made
while building to the training dtype) or left uninitialised by a build on the meta device.

Only for self-attention: queries and keys must share one position axis.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys (B, h, T, d) by their positions (see the module docstring).

    ``rotary_dim`` (default ``head_dim``, even) rotates only the first ``rotary_dim`` channels of
    each head and passes the rest through (partial rotary, as GPT-J / GPT-NeoX allow).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: Optional[int] = None) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"rotary embedding: rotary_dim={rotary_dim} must be even and in (0, head_dim={head_dim}]; "
                "pick an even head size (hidden_size / num_heads)"
            )
        if base <= 0:
            raise ValueError(f"rotary embedding: base must be > 0, got {base}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = base

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, r) of positions (T,), computed in float64."""
        channel = torch.arange(0, self.rotary_dim, 2, device=positions.device).to(torch.float64)  # (r / 2,)
        inv_freq = self.base ** (-channel / self.rotary_dim)
        freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, r / 2)
        freqs = torch.cat([freqs, freqs], dim=-1)  # (T, r)
        return freqs.cos(), freqs.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, h, T, d) rotated by cos, sin (T, r)."""
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        rotated = rot * cos.to(x.dtype) + rotate_half(rot) * sin.to(x.dtype)  # (B, h, T, r)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, h, T, d) -> both rotated; ``positions`` (T,) (default 0 .. T - 1)."""
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"rotary embedding was built for head_dim={self.head_dim}, got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"rotary embedding is for self-attention: queries ({q.shape[-2]}) and keys ({k.shape[-2]}) "
                "must share their positions"
            )
        if positions is None:
            positions = torch.arange(q.shape[-2], device=q.device)
        cos, sin = self.angles(positions)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}"
