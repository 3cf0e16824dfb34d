"""Model FLOPs from config shapes, model FLOPs utilisation (MFU), and a matmul peak probe.

Convention (PaLM appendix B / Megatron-LM "model FLOPs"): only matrix multiplications are
counted, a multiply-add being 2 FLOPs, so a product (m x k) @ (k x n) costs ``2 * m * k * n``.
Not counted: embedding lookups, position additions, LayerNorm, softmax, GELU, biases, the L2
normalisation, the temperature scaling, cross-entropy, the optimizer step, and any
recomputation (activation checkpointing does not change *model* FLOPs). Attention is counted
over all token pairs (T x T), padding included, because the model computes over the padded
text (the key padding mask only hides keys from the softmax).

Training is counted as 3 x forward (backward = 2 x forward: one matmul for the input gradient
and one for the weight gradient of every forward matmul), the standard MFU convention. The
backward really executed skips the input gradient of the patch embedding (pixels need no
gradient), so autograd runs ``3 * forward - forward_patch_embedding`` matmul FLOPs;
``tests/test_flops.py`` checks both numbers against ``torch.utils.flop_counter``.

The counts are of the whole (unsharded) model per sample: tensor parallelism splits the same
FLOPs over ranks and ZeRO does not change them. For MFU, pass the throughput and the peak of
the same set of devices, e.g. global samples/s and ``world_size * per-device peak``.

This module belongs to the ``config`` layer: it imports only :mod:`megamm.config` and the
standard library (``torch`` is imported lazily, inside :func:`measure_matmul_peak` only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from megamm.config import ImageConfig, ModelConfig, TextConfig, TransformerConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

TRAINING_MULTIPLIER = 3
"""Training FLOPs = TRAINING_MULTIPLIER x forward FLOPs (forward + a backward of 2 x forward)."""


# ----------------------------------------------------------------------------------------------
# Elementary counts


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m x k) @ (k x n): ``2 * m * k * n`` (one multiply and one add per term)."""
    return 2 * m * k * n


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """FLOPs of a Linear(in -> out) applied to ``tokens`` rows: ``2 * T * in * out`` (bias not counted)."""
    return matmul_flops(tokens, in_features, out_features)


def attention_core_flops(tokens: int, hidden: int) -> int:
    """FLOPs of the attention scores and weighted values of one sequence, all heads together.

    Per head of width d = H / heads: scores Q K^T (T x d) @ (d x T) -> 2 * T * T * d, and
    weighted values P V (T x T) @ (T x d) -> 2 * T * T * d. Summed over heads (heads * d = H):
    ``2 * T * T * H + 2 * T * T * H = 4 * T^2 * H``, independent of the head count.
    """
    return 2 * matmul_flops(tokens, hidden, tokens)


def transformer_block_flops(tokens: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of one pre-norm transformer block on one sequence of ``tokens`` tokens.

    - Q, K, V and output projections, four Linear(H, H):  ``4 * 2 * T * H * H``
    - attention scores and weighted values:               ``2 * T * T * H + 2 * T * T * H``
    - MLP, Linear(H, F) then Linear(F, H):                ``2 * 2 * T * H * F``
    """
    projections = 4 * linear_flops(tokens, hidden, hidden)  # (T, H) @ (H, H), x4
    attention = attention_core_flops(tokens, hidden)  # (T, d) @ (d, T) and (T, T) @ (T, d), per head
    mlp = linear_flops(tokens, hidden, ffn) + linear_flops(tokens, ffn, hidden)  # (T, H) -> (T, F) -> (T, H)
    return projections + attention + mlp


def tower_flops(tower: TransformerConfig, tokens: int) -> int:
    """Forward FLOPs of ``tower.num_layers`` blocks on one sequence (the final LayerNorm is free)."""
    return tower.num_layers * transformer_block_flops(tokens, tower.hidden_size, tower.ffn_size)


def image_num_patches(image: ImageConfig) -> int:
    """Patches per image: ``(S / P)^2``."""
    return (image.image_size // image.patch_size) ** 2


def image_tokens(image: ImageConfig) -> int:
    """Image sequence length: the patches plus the class token, ``(S / P)^2 + 1``."""
    return image_num_patches(image) + 1


def text_tokens(text: TextConfig) -> int:
    """Text sequence length: the padded ``max_length`` (the model computes over padding)."""
    return text.max_length


# ----------------------------------------------------------------------------------------------
# Whole model


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of one sample (see the module docstring for what is counted).

    ``breakdown`` holds the forward FLOPs per component; its values sum to ``forward``.
    """

    forward: int
    """Forward FLOPs per sample."""
    training: int
    """Forward + backward FLOPs per sample, ``3 * forward``."""
    breakdown: dict[str, int] = field(default_factory=dict, hash=False)
    """Forward FLOPs per component: image_patch_embedding, image_blocks, text_blocks,
    projections and, when a global batch is known, contrastive_logits."""

    @property
    def backward(self) -> int:
        """Backward FLOPs per sample, ``2 * forward``."""
        return self.training - self.forward


def model_flops_per_sample(model_config: ModelConfig, *, global_batch: Optional[int] = None) -> FlopCount:
    """Matmul FLOPs per sample of ``MultiModalTransformer(model_config)``.

    With S = image_size, P = patch_size, C = channels, N = (S/P)^2 + 1 image tokens, T =
    text max_length, E = embed_dim, B_g = ``global_batch``, and per tower H, F = ffn_size, L:

    - image_patch_embedding: ``2 * (S/P)^2 * (C*P*P) * H_img``  (the class token is not projected)
    - image_blocks:          ``L_img * transformer_block_flops(N, H_img, F_img)``
    - text_blocks:           ``L_txt * transformer_block_flops(T, H_txt, F_txt)``  (padding included;
      the token embedding is a lookup, not a matmul)
    - projections:           ``2 * H_img * E + 2 * H_txt * E``  (pooled features -> embedding space)
    - contrastive_logits:    ``2 * 2 * E * B_g``: each sample's image row scores all B_g texts
      and its text row all B_g images, two (1 x E) @ (E x B_g) products. Omitted (no key in
      ``breakdown``) when ``global_batch`` is None, because it depends on the batch.

    ``training`` is ``3 * forward``.
    """
    if global_batch is not None and global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    image, text, embed = model_config.image, model_config.text, model_config.embed_dim
    patch_features = image.channels * image.patch_size * image.patch_size
    breakdown: dict[str, int] = {
        # (N-1, C*P*P) @ (C*P*P, H_img)
        "image_patch_embedding": linear_flops(image_num_patches(image), patch_features, image.hidden_size),
        # L x block on (N, H_img)
        "image_blocks": tower_flops(image, image_tokens(image)),
        # L x block on (T, H_txt)
        "text_blocks": tower_flops(text, text_tokens(text)),
        # (1, H_img) @ (H_img, E) + (1, H_txt) @ (H_txt, E)
        "projections": linear_flops(1, image.hidden_size, embed) + linear_flops(1, text.hidden_size, embed),
    }
    if global_batch is not None:
        # (1, E) @ (E, B_g) for image->text and for text->image
        breakdown["contrastive_logits"] = 2 * matmul_flops(1, embed, global_batch)
    forward = sum(breakdown.values())
    return FlopCount(forward=forward, training=TRAINING_MULTIPLIER * forward, breakdown=breakdown)


# ----------------------------------------------------------------------------------------------
# Utilisation


def mfu(samples_per_second: float, flops_per_sample: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: ``samples_per_second * flops_per_sample / peak_flops_per_second``.

    Use training FLOPs per sample for a training step. ``samples_per_second`` and
    ``peak_flops_per_second`` must describe the same devices (global throughput with the summed
    peak of all devices, or one device's share with one device's peak).
    """
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second must be positive, got {peak_flops_per_second}")
    if samples_per_second < 0 or flops_per_sample < 0:
        raise ValueError("samples_per_second and flops_per_sample must be >= 0")
    return samples_per_second * flops_per_sample / peak_flops_per_second


def measure_matmul_peak(
    dtype: Optional["torch.dtype"] = None,
    size: int = 2048,
    repeats: int = 3,
    device: Optional["torch.device | str"] = None,
    min_repeat_seconds: float = 0.02,
) -> float:
    """Achieved FLOP/s of a square ``size x size`` matmul on ``device``: a practical peak.

    ``dtype`` defaults to ``torch.float32`` and ``device`` to the CPU. One warm-up product,
    then ``repeats`` timed repeats; each repeat runs enough back-to-back products to last at
    least ``min_repeat_seconds`` (one on a CPU, many on a GPU where one product takes
    microseconds), and the best repeat counts: ``2 * size^3 * products / seconds``. On CUDA
    the device is synchronised around every timed repeat. About 1 s on 2 CPU cores for fp32
    at size 2048 (one thread: ~90 GFLOP/s).
    """
    import torch  # lazily: the rest of this module needs only the standard library

    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}")
    dtype = torch.float32 if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    is_cuda = device.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    def timed(products: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b, out=c)  # (size, size) @ (size, size)
        sync()
        return time.perf_counter() - start

    with torch.inference_mode():
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        one = timed(1)  # warm-up, and a first estimate of one product's time
        products = max(1, math.ceil(min_repeat_seconds / max(one, 1e-9)))
        if products > 1:
            one = timed(1)  # the first call may include one-time set-up (cuBLAS handles, ...)
            products = max(1, math.ceil(min_repeat_seconds / max(one, 1e-9)))
        best = min(timed(products) for _ in range(repeats))
    return matmul_flops(size, size, size) * products / max(best, 1e-12)
