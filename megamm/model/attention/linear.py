"""Linear (kernelised) attention: softmax(q k^T) replaced by a feature map, phi(q) phi(k)^T, so the
keys and values can be summed once instead of scored per query.

    context_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)

Non-causal: ``phi(K)^T V`` (m x d) and ``sum_j phi(k_j)`` once, then one product per query: O(T m d)
time, O(T (m + d) + m d) memory. Causal: the same sums over ``j <= i``, chunked: within a chunk of
C positions the masked C x C products, across chunks the running sums of earlier chunks
(``chunk_size``): O(T C (m + d)) time, O(T C + (T / C) m d) memory. (Random features rescale
the earlier chunks' sums per chunk through a (T / C) x (T / C) matrix of factors: another
O((T / C)^2 m d) time, below the rest up to T ~ 2 C^3 / d: 8192 at C = d = 64.)

Feature maps (``feature_map``):

- ``"elu"``: ``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020), m = d;
- ``"random"``: positive random features (Performer's FAVOR+, Choromanski et al., 2021),
  ``phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m)`` for r = 1..m, x' = x d^(-1/4), whose dot
  products estimate ``exp(q . k / sqrt(d))`` (softmax attention) without bias. The projection
  ``w`` (m x d, orthogonal blocks by default) is fixed: drawn in float64 on the CPU from ``seed``
  at its first use on a device and kept there (:meth:`LinearAttention.projection`). It is the
  same on every tensor-parallel rank (every head uses it) and is not saved in checkpoints (the
  seed redraws it). It is deliberately not a registered buffer: DeepSpeed's ``zero.Init`` casts
  every ``torch.randn`` made while building to the training dtype (bf16 would round it), and a
  build on the meta device followed by ``to_empty`` would leave a non-persistent buffer
  uninitialised.

Random features are computed in a numerically safe form: a query's features are divided by their
largest one, and keys' by the largest key feature (non-causal: over all real keys; causal: for
query i, over the keys up to i, the running sums of earlier chunks rescaled to it, so no output
depends on a later key even through rounding). The factors cancel between numerator and
denominator; every one applied is at most 1, so nothing overflows.

Padded keys are excluded by zeroing their features. A query with no key (all padded) gets a zero
context. Linear attention forms no attention probabilities: it has no attention dropout, and a
module with ``attention_dropout > 0`` rejects it. Inputs in half precision are computed in
float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megamm.model.attention.core import AttentionKernel, register_kernel

FEATURE_MAPS = ("elu", "random")


def random_projection(num_features: int, head_dim: int, seed: int, orthogonal: bool = True) -> torch.Tensor:
    """(num_features, head_dim) float64 Gaussian projection drawn on the CPU from ``seed``.

    ``orthogonal``: rows in blocks of ``head_dim`` mutually orthogonal, each row rescaled to the
    norm of a Gaussian vector (Performer's orthogonal random features: same expectation, lower
    variance)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def gaussian(rows: int) -> torch.Tensor:
        return torch.randn(rows, head_dim, generator=generator, dtype=torch.float64, device="cpu")

    if not orthogonal:
        return gaussian(num_features)
    blocks = []
    for start in range(0, num_features, head_dim):
        q, _ = torch.linalg.qr(gaussian(head_dim))
        blocks.append(q.T[: num_features - start])
    return torch.cat(blocks) * gaussian(num_features).norm(dim=1, keepdim=True)  # (m, d) float64


@register_kernel("linear")
class LinearAttention(AttentionKernel):
    """Kernelised attention in O(T): ``feature_map`` "elu" (elu + 1) or "random" (positive random
    features, ``num_features`` of them, default ``head_dim``; projection drawn from ``seed``).
    ``chunk_size`` bounds the causal variant's memory (see the module docstring). No attention
    probabilities, hence no attention dropout."""

    has_probabilities = False
    needs_head_dim = True

    def __init__(
        self,
        feature_map: str = "elu",
        head_dim: Optional[int] = None,
        num_features: Optional[int] = None,
        seed: int = 0,
        orthogonal: bool = True,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear attention: feature_map {feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
        if chunk_size < 1:
            raise ValueError(f"linear attention: chunk_size must be >= 1, got {chunk_size}")
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.head_dim = head_dim
        self.seed = seed
        self.orthogonal = orthogonal
        self._projections: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        if feature_map == "random":
            if head_dim is None:
                raise ValueError(
                    "linear attention with feature_map='random' needs head_dim (the attention modules pass "
                    "their own; attention_kernel('linear', head_dim=..., feature_map='random'))"
                )
            self.num_features = num_features or head_dim
        else:
            if num_features is not None and head_dim is not None and num_features != head_dim:
                raise ValueError("linear attention: feature_map='elu' has num_features = head_dim; drop num_features")
            self.num_features = head_dim

    def projection(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The random features' (num_features, head_dim) projection on ``device`` (default: the CPU)
        in ``dtype``, drawn from ``seed`` at first use (see the module docstring)."""
        if self.feature_map != "random":
            raise ValueError("linear attention: only feature_map='random' has a projection")
        key = (torch.device(device if device is not None else "cpu"), dtype)
        if key not in self._projections:
            drawn = random_projection(self.num_features, self.head_dim, self.seed, self.orthogonal)
            self._projections[key] = drawn.to(device=key[0], dtype=dtype)
        return self._projections[key]

    # ------------------------------------------------------------------------------------------
    # Feature maps

    def _random_logits(self, x: torch.Tensor) -> torch.Tensor:
        """w . x' for x' = x d^(-1/4): (B, h, T, d) -> (B, h, T, m)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"linear attention: random features were drawn for head_dim={self.head_dim}, got {x.shape[-1]}"
            )
        return torch.matmul(x * x.shape[-1] ** -0.25, self.projection(x.device, x.dtype).T)

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        """phi(q) (B, h, T, m), up to a positive factor per query (which cancels)."""
        if self.feature_map == "elu":
            return F.elu(q) + 1
        logits = self._random_logits(q)  # (B, h, T, m); -|q'|^2 / 2 is a factor per query: dropped
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach()) / math.sqrt(self.num_features)

    def key_logits(self, k: torch.Tensor) -> torch.Tensor:
        """log phi(k) * sqrt(m) for random features: w . k' - |k'|^2 / 2, (B, h, T, m)."""
        scaled = k * k.shape[-1] ** -0.25
        return self._random_logits(k) - scaled.pow(2).sum(dim=-1, keepdim=True) / 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The exact feature map of queries and keys alike, without the stabilising factors (for
        references and tests): (B, h, T, d) -> (B, h, T, m)."""
        if self.feature_map == "elu":
            return F.elu(x) + 1
        scaled = x * x.shape[-1] ** -0.25
        logits = self._random_logits(x) - scaled.pow(2).sum(dim=-1, keepdim=True) / 2
        return torch.exp(logits) / math.sqrt(self.num_features)

    # ------------------------------------------------------------------------------------------

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
        if dropout_p > 0:
            raise ValueError("linear attention forms no attention probabilities to drop: set attention_dropout=0")
        dtype = q.dtype
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        valid = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # (Bm, 1, Tk, 1)
        phi_q = self.query_features(q)  # (B, h, Tq, m)
        if causal:
            context = self._causal(phi_q, k, v, valid)
        else:
            context = self._global(phi_q, k, v, valid)
        return context.to(dtype)  # (B, h, Tq, d)

    def _key_features(
        self, k: torch.Tensor, valid: Optional[torch.Tensor], stabiliser: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """phi(k) with padded keys zeroed; random features divided by exp(stabiliser)."""
        if self.feature_map == "elu":
            phi = F.elu(k) + 1
            return phi if valid is None else phi.masked_fill(~valid, 0.0)
        logits = self.key_logits(k) - stabiliser
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))  # exp(-inf) = 0, and so is its gradient
        return torch.exp(logits) / math.sqrt(self.num_features)

    @staticmethod
    def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        """numerator (..., d) / denominator (..., 1); a zero denominator (no key) gives zero."""
        return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)

    def _global(
        self, phi_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> torch.Tensor:
        stabiliser = None
        if self.feature_map == "random":
            logits = self.key_logits(k).detach()  # (B, h, Tk, m)
            if valid is not None:
                logits = logits.masked_fill(~valid, float("-inf"))
            stabiliser = logits.amax(dim=(-2, -1), keepdim=True)  # (B, h, 1, 1): the largest real key feature
            stabiliser = torch.where(torch.isfinite(stabiliser), stabiliser, torch.zeros_like(stabiliser))
        phi_k = self._key_features(k, valid, stabiliser)  # (B, h, Tk, m)
        kv = torch.matmul(phi_k.transpose(-1, -2), v)  # (B, h, m, d)
        normaliser = phi_k.sum(dim=-2, keepdim=True)  # (B, h, 1, m)
        numerator = torch.matmul(phi_q, kv)  # (B, h, Tq, d)
        denominator = (phi_q * normaliser).sum(dim=-1, keepdim=True)  # (B, h, Tq, 1)
        return self._divide(numerator, denominator)

    def _causal(
        self, phi_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> torch.Tensor:
        batch, heads, length, dim = v.shape
        chunk = min(self.chunk_size, length)
        blocks = -(-length // chunk)
        padded = blocks * chunk
        pad = padded - length
        if pad:  # padded positions are keys no real query sees (later than every one of them)
            phi_q = F.pad(phi_q, (0, 0, 0, pad))
            k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
            if valid is None:
                valid = torch.ones(1, 1, length, 1, dtype=torch.bool, device=v.device)
            valid = F.pad(valid, (0, 0, 0, pad), value=False)
        features = phi_q.shape[-1]
        past = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()  # (C, C): key j <= query i
        earlier = torch.ones(blocks, blocks, dtype=torch.bool, device=v.device).tril(-1)  # (n, n): chunk s < c

        if self.feature_map == "random":
            # Every key feature of query i is taken relative to r_i, the largest key logit up to i
            # (a factor exp(-r_i) per query, which cancels): each factor below is exp(<= 0).
            logits = self.key_logits(k).detach()  # (B, h, T', m)
            if valid is not None:
                logits = logits.masked_fill(~valid, float("-inf"))
            running = torch.cummax(logits.amax(dim=-1), dim=-1).values  # (B, h, T'): r_i
            running = running.clamp_min(torch.finfo(running.dtype).min)  # no real key yet: finite
            phi_k = self._key_features(k, valid, running[..., None])  # (B, h, T', m): exp(a_j - r_j)
            r = running.view(batch, heads, blocks, chunk)  # (B, h, n, C)
            end = r[..., -1]  # (B, h, n): r at each chunk's end
            before = F.pad(end[..., :-1], (1, 0), value=float("-inf"))  # (B, h, n): r before each chunk
            intra = torch.exp((r[..., None, :] - r[..., :, None]).masked_fill(~past, float("-inf")))  # (B, h, n, C, C)
            to_end = torch.exp(r - end[..., None])[..., None]  # (B, h, n, C, 1): exp(r_j - end_s)
            decay = (end[..., None, :] - before[..., :, None]).masked_fill(~earlier, float("-inf"))
            decay = torch.exp(decay)  # (B, h, n, n): exp(end_s - before_c) for s < c
            from_before = torch.exp(before[..., None] - r)[..., None]  # (B, h, n, C, 1): exp(before_c - r_i)
        else:
            phi_k = self._key_features(k, valid, None)  # (B, h, T', m)

        qc = phi_q.view(batch, heads, blocks, chunk, features)  # (B, h, n, C, m)
        kc = phi_k.view(batch, heads, blocks, chunk, features)  # (B, h, n, C, m)
        vc = v.reshape(batch, heads, blocks, chunk, dim)  # (B, h, n, C, d)

        # Within a chunk: the masked C x C products.
        weights = torch.matmul(qc, kc.transpose(-1, -2))  # (B, h, n, C, C)
        weights = weights * intra if self.feature_map == "random" else weights.masked_fill(~past, 0.0)
        numerator = torch.matmul(weights, vc)  # (B, h, n, C, d)
        denominator = weights.sum(dim=-1, keepdim=True)  # (B, h, n, C, 1)

        # Across chunks: the sums over every earlier chunk.
        if self.feature_map == "random":
            kc = kc * to_end  # relative to its chunk's end
        kv = torch.matmul(kc.transpose(-1, -2), vc)  # (B, h, n, m, d)
        ksum = kc.sum(dim=-2)  # (B, h, n, m)
        if self.feature_map == "random":
            state = torch.einsum("bhcs,bhsmd->bhcmd", decay, kv)  # (B, h, n, m, d): relative to before_c
            state_sum = torch.einsum("bhcs,bhsm->bhcm", decay, ksum)  # (B, h, n, m)
            inter = torch.matmul(qc, state) * from_before  # (B, h, n, C, d)
            inter_sum = (qc * state_sum[..., None, :]).sum(dim=-1, keepdim=True) * from_before  # (B, h, n, C, 1)
        else:
            state = F.pad(torch.cumsum(kv, dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # (B, h, n, m, d): chunks before each
            state_sum = F.pad(torch.cumsum(ksum, dim=2)[:, :, :-1], (0, 0, 1, 0))  # (B, h, n, m)
            inter = torch.matmul(qc, state)  # (B, h, n, C, d)
            inter_sum = (qc * state_sum[..., None, :]).sum(dim=-1, keepdim=True)  # (B, h, n, C, 1)
        context = self._divide(numerator + inter, denominator + inter_sum).reshape(batch, heads, padded, dim)
        return context[:, :, :length]  # (B, h, T, d)

    def extra_repr(self) -> str:
        return (
            f"feature_map={self.feature_map}, num_features={self.num_features}, seed={self.seed}, "
            f"chunk_size={self.chunk_size}"
        )
