"""Attention kernels: what happens between the projections.

A kernel maps queries, keys and values of this rank's heads to their context,
``q (B, h, Tq, d), k (B, h, Tk, d), v (B, h, Tk, d) -> (B, h, Tq, d)``, given an optional key
padding mask ``(B, Tk)`` or ``(1, Tk)`` bool (True = real token), ``causal`` (query ``i`` sees keys
``j <= i``; needs ``Tq == Tk``) and the dropout probability of its attention probabilities. It
holds no trainable weights: the tensor-parallel modules (:class:`ParallelSelfAttention`,
:class:`ParallelCrossAttention`) own the projections and split the heads over the group; a kernel
works head by head, so it is the same at every tensor-parallel size.

Kernels by name (:func:`attention_kernel`):

- ``full``: ``F.scaled_dot_product_attention`` (:class:`FullAttention`);
- ``local``: sliding-window attention with optional global tokens (:class:`~.sparse.LocalAttention`);
- ``block_sparse``: block-sparse attention (:class:`~.sparse.BlockSparseAttention`);
- ``linear``: kernelised linear attention (:class:`~.linear.LinearAttention`).

Conventions shared by every kernel: a query with no key to attend to (every key padded, or
outside its window) gets a zero context (as ``F.scaled_dot_product_attention`` gives on fully
masked rows); the scores are scaled by ``1 / sqrt(d)`` unless ``scale`` is given; dropout applies
to attention probabilities, so a kernel without them (``linear``) rejects ``dropout_p > 0``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

KERNELS: dict[str, type["AttentionKernel"]] = {}
"""Every registered kernel class by name (filled by :func:`register_kernel`)."""


def register_kernel(name: str) -> Callable[[type["AttentionKernel"]], type["AttentionKernel"]]:
    """Class decorator: make a kernel constructible by ``attention_kernel(name, ...)``."""

    def register(cls: type["AttentionKernel"]) -> type["AttentionKernel"]:
        if name in KERNELS and KERNELS[name] is not cls:
            raise ValueError(f"attention kernel {name!r} is registered twice")
        cls.name = name
        KERNELS[name] = cls
        return cls

    return register


def _load_builtin_kernels() -> None:
    """Register the kernels of the sibling modules (imported here, not at the top: they import this one)."""
    for module in ("sparse", "linear"):
        importlib.import_module(f"megamm.model.attention.{module}")


def kernel_names() -> list[str]:
    """The names :func:`attention_kernel` accepts."""
    _load_builtin_kernels()
    return sorted(KERNELS)


def attention_kernel(name: str, head_dim: Optional[int] = None, **options: Any) -> "AttentionKernel":
    """The kernel registered as ``name``, built with ``options`` (its constructor's arguments).

    ``head_dim`` is passed on only to kernels that need it (``linear`` with random features draws a
    ``(num_features, head_dim)`` projection); the attention modules pass their own.
    """
    _load_builtin_kernels()
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}: choose one of {', '.join(sorted(KERNELS))}")
    cls = KERNELS[name]
    if cls.needs_head_dim:
        options = {"head_dim": head_dim, **options}
    try:
        return cls(**options)
    except TypeError as error:
        raise TypeError(f"attention kernel {name!r}: {error}") from error


def as_kernel(
    kernel: Union[str, "AttentionKernel", None], options: Optional[Mapping[str, Any]], head_dim: int
) -> "AttentionKernel":
    """A kernel from what a module was given: None (``full``), a name (built with ``options``), or a
    kernel (``options`` must then be empty)."""
    if kernel is None:
        kernel = "full"
    if isinstance(kernel, str):
        return attention_kernel(kernel, head_dim=head_dim, **dict(options or {}))
    if not isinstance(kernel, AttentionKernel):
        raise TypeError(f"kernel must be a kernel name or an AttentionKernel, got {type(kernel).__name__}")
    if options:
        raise ValueError("kernel_options are for a kernel given by name; this kernel is already built")
    return kernel


class AttentionKernel(nn.Module):
    """Base class of attention kernels (see the module docstring for the contract).

    Class attributes say what a kernel can do: ``has_probabilities`` (it forms attention
    probabilities, so attention dropout applies), ``supports_cross`` (``Tq != Tk``: cross-attention)
    and ``needs_head_dim`` (its constructor takes ``head_dim``).
    """

    name: ClassVar[str] = "?"
    has_probabilities: ClassVar[bool] = True
    supports_cross: ClassVar[bool] = True
    needs_head_dim: ClassVar[bool] = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        """q (B, h, Tq, d), k and v (B, h, Tk, d), key_padding_mask (B, Tk) or (1, Tk) bool
        (True = real token) -> context (B, h, Tq, d)."""
        raise NotImplementedError

    def check(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool
    ) -> None:
        """Shape checks shared by every kernel, with errors naming the argument at fault."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"{self.name} attention: q, k, v must be (B, h, T, d), "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"{self.name} attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree "
                "(k and v must match; q must share B, h and d with them)"
            )
        if q.shape[2] != k.shape[2] and (causal or not self.supports_cross):
            what = "causal attention" if causal else f"the {self.name} kernel"
            raise ValueError(
                f"{what} needs as many queries as keys (Tq={q.shape[2]}, Tk={k.shape[2]}): "
                "use the full or linear kernel, without causal, for cross-attention"
            )
        if key_padding_mask is not None:
            batch, length = q.shape[0], k.shape[2]
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}: pass mask.bool()"
                )
            shape = tuple(key_padding_mask.shape)
            if len(shape) != 2 or shape[1] != length or shape[0] not in (1, batch):
                raise ValueError(
                    f"key_padding_mask must be (B, Tk) = ({batch}, {length}) or (1, {length}), "
                    f"got {tuple(key_padding_mask.shape)}"
                )


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    """``scale``, or ``1 / sqrt(head_dim)``."""
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def masked_softmax(
    scores: torch.Tensor, valid: torch.Tensor, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dimension of ``scores`` where ``valid`` (broadcast to it) is True.

    Returns the probabilities and ``has_key`` (``valid.any(-1, keepdim=True)``): a row with no
    valid entry gets finite probabilities that mean nothing, so the caller zeroes its output rows
    with ``has_key`` (cheaper than zeroing the probabilities: no second score-sized tensor). Masked
    scores are filled with the dtype's lowest value, not -inf, so no row produces NaNs.
    Half-precision scores are normalised in float32. Dropout (``dropout_p``) drops probabilities
    from the current random stream.
    """
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if low_precision else None).to(scores.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    return probs, valid.any(dim=-1, keepdim=True)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Explicit softmax attention: q (B, h, Tq, d), k, v (B, h, Tk, d), ``valid`` broadcastable
    to (B, h, Tq, Tk) -> (B, h, Tq, d); a query with no valid key gets zeros. Materialises the
    scores: for short query ranges only."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, h, Tq, Tk)
    probs, has_key = masked_softmax(scores, valid, dropout_p)
    return torch.matmul(probs, v).masked_fill(~has_key, 0.0)  # (B, h, Tq, d)


@register_kernel("full")
class FullAttention(AttentionKernel):
    """Every query attends to every (real; with ``causal``, earlier) key:
    ``F.scaled_dot_product_attention``, O(T^2) time. Its memory is the backend's: the CPU and
    CUDA flash / memory-efficient backends keep O(T), the math backend O(T^2) (see
    docs/benchmarks/attention). Causal attention with a key padding mask passes a (B, 1, T, T)
    boolean mask."""

    def __init__(self, scale: Optional[float] = None) -> None:
        super().__init__()
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
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk): True = attend
        is_causal = causal and attn_mask is None
        if causal and attn_mask is not None:
            length = q.shape[2]
            past = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # (T, T)
            attn_mask = attn_mask & past  # (B, 1, T, T)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )  # (B, h, Tq, d)

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale}"
