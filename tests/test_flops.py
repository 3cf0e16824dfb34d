"""megamm.flops against a hand count and against torch.utils.flop_counter on the real model.

What FlopCounterMode sees on CPU (torch 2.x): F.scaled_dot_product_attention dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (and ``..._backward``), which has no
entry in FlopCounterMode's registry, so by default attention is *not* counted on CPU. The
tests therefore count it two ways: (a) forcing the math backend, whose explicit bmm's the
counter sees, and (b) keeping the default CPU kernel and mapping it to torch's own SDPA
formulas through ``custom_mapping``. Both must equal megamm.flops exactly.

Forward: counter / B == model_flops_per_sample(cfg, global_batch=B).forward, exactly (one
process, so the gathered batch is the local batch B).
Forward + backward: counter / B == 3 * forward - image_patch_embedding, exactly, with the
math backend: autograd skips the input gradient of the patch embedding because pixels need no
gradient; every other matmul gets an input- and a weight-gradient matmul (2x), the attention
bmm's included. With the mapped CPU kernel, torch's sdpa_backward_flop_count adds the
flash-style recomputation of the scores Q K^T (half the attention forward, 2 * T^2 * H per
layer): hardware FLOPs that the model-FLOPs convention leaves out.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from megamm.config import ImageConfig, ModelConfig, TextConfig, load_config
from megamm.flops import FlopCount, measure_matmul_peak, mfu, model_flops_per_sample


def one_block_config() -> ModelConfig:
    """A one-block model; the towers have different widths so mix-ups show."""
    return ModelConfig(
        image=ImageConfig(
            image_size=8, patch_size=4, channels=3, hidden_size=16, num_layers=1, num_heads=2, mlp_ratio=4.0
        ),
        text=TextConfig(vocab_size=32, max_length=6, hidden_size=12, num_layers=1, num_heads=2, mlp_ratio=4.0),
        embed_dim=8,
    )


def test_one_block_matches_hand_count() -> None:
    # Image: (8/4)^2 = 4 patches of 3*4*4 = 48 features, N = 5 tokens, H = 16, F = 64.
    # Text: T = 6, H = 12, F = 48. E = 8. Global batch 3.
    patch_embedding = 2 * 4 * 48 * 16
    image_block = 4 * 2 * 5 * 16 * 16 + 2 * 2 * 5 * 5 * 16 + 2 * 2 * 5 * 16 * 64
    text_block = 4 * 2 * 6 * 12 * 12 + 2 * 2 * 6 * 6 * 12 + 2 * 2 * 6 * 12 * 48
    projections = 2 * 16 * 8 + 2 * 12 * 8
    logits = 2 * 2 * 8 * 3
    expected = patch_embedding + image_block + text_block + projections + logits
    assert expected == 6144 + 32320 + 22464 + 448 + 96 == 61472

    count = model_flops_per_sample(one_block_config(), global_batch=3)
    assert count.breakdown == {
        "image_patch_embedding": patch_embedding,
        "image_blocks": image_block,
        "text_blocks": text_block,
        "projections": projections,
        "contrastive_logits": logits,
    }
    assert count.forward == expected
    assert count.training == 3 * expected
    assert count.backward == 2 * expected

    without_batch = model_flops_per_sample(one_block_config())
    assert "contrastive_logits" not in without_batch.breakdown
    assert without_batch.forward == expected - logits
    assert isinstance(count, FlopCount)
    with pytest.raises(ValueError):
        model_flops_per_sample(one_block_config(), global_batch=0)


# ----------------------------------------------------------------------------------------------
# Against torch.utils.flop_counter on the real model


def _sdpa_cpu_forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


CPU_SDPA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def _counted(config: ModelConfig, batch: int, partial_mask: bool, backward: bool, attention: str) -> float:
    """FLOPs per sample that FlopCounterMode counts for one forward (and backward) pass.

    attention: "math" (math SDPA backend), "mapped" (default CPU kernel + CPU_SDPA_FORMULAS)
    or "default" (default CPU kernel, no mapping: attention uncounted).
    """
    from megamm.model import MultiModalTransformer

    torch.manual_seed(0)
    model = MultiModalTransformer(config)
    image = torch.randn(batch, config.image.channels, config.image.image_size, config.image.image_size)
    length = config.text.max_length
    ids = torch.randint(0, config.text.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)  # (B, T), True = real token
    if partial_mask:
        lengths = torch.arange(batch) % (length - 2) + 3  # 3 .. T real tokens
        mask = torch.arange(length)[None, :] < lengths[:, None]
    mapping: Optional[dict[Any, Any]] = CPU_SDPA_FORMULAS if attention == "mapped" else None
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    backends = [SDPBackend.MATH] if attention == "math" else [SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends), counter:
        out = model(image, ids, mask, compute_loss=True)
        if backward:
            out["loss"].backward()
    return counter.get_total_flops() / batch


def _attention_flops(config: ModelConfig) -> int:
    image_tokens = (config.image.image_size // config.image.patch_size) ** 2 + 1
    return (
        config.image.num_layers * 4 * image_tokens**2 * config.image.hidden_size
        + config.text.num_layers * 4 * config.text.max_length**2 * config.text.hidden_size
    )


CASES = [
    pytest.param(one_block_config(), 3, False, id="one-block-full-mask"),
    pytest.param(one_block_config(), 3, True, id="one-block-partial-mask"),
    pytest.param(load_config("clip_tiny").model, 4, True, id="tiny-partial-mask"),
]


@pytest.mark.parametrize("config, batch, partial_mask", CASES)
@pytest.mark.parametrize("attention", ["math", "mapped"])
def test_forward_matches_flop_counter(config: ModelConfig, batch: int, partial_mask: bool, attention: str) -> None:
    # One process: the contrastive logits span the local batch, so global_batch = B.
    expected = model_flops_per_sample(config, global_batch=batch).forward
    assert _counted(config, batch, partial_mask, backward=False, attention=attention) == expected


@pytest.mark.parametrize("config, batch, partial_mask", CASES)
@pytest.mark.parametrize("attention", ["math", "mapped"])
def test_training_matches_flop_counter(config: ModelConfig, batch: int, partial_mask: bool, attention: str) -> None:
    count = model_flops_per_sample(config, global_batch=batch)
    # The patch embedding's input gradient (d pixels) is never computed.
    expected = count.training - count.breakdown["image_patch_embedding"]
    if attention == "mapped":
        # torch's flash-style SDPA backward formula also counts recomputing the scores Q K^T
        # (2 * T^2 * H per layer, half the attention forward): hardware FLOPs, not model FLOPs.
        expected += _attention_flops(config) // 2
    assert _counted(config, batch, partial_mask, backward=True, attention=attention) == expected


def test_default_cpu_sdpa_is_not_counted_by_flop_counter() -> None:
    """Documents why the tests above force or map the attention kernel."""
    config, batch = load_config("clip_tiny").model, 4
    count = model_flops_per_sample(config, global_batch=batch)
    counted = _counted(config, batch, partial_mask=True, backward=False, attention="default")
    assert counted == count.forward - _attention_flops(config)


def test_tiny_forward_flops() -> None:
    """The tiny recipe's numbers, for reference (global batch 4)."""
    count = model_flops_per_sample(load_config("clip_tiny").model, global_batch=4)
    assert count.breakdown == {
        "image_patch_embedding": 393_216,
        "image_blocks": 14_942_720,
        "text_blocks": 5_013_504,
        "projections": 16_384,
        "contrastive_logits": 1_024,
    }
    assert count.forward == 20_366_848


# ----------------------------------------------------------------------------------------------
# MFU and the matmul peak


def test_mfu_arithmetic() -> None:
    # 100 samples/s x 6e9 FLOPs/sample = 6e11 FLOP/s achieved on a 1.2e12 FLOP/s peak -> 0.5.
    assert mfu(100.0, 6e9, 1.2e12) == pytest.approx(0.5)
    assert mfu(0.0, 6e9, 1e12) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_measure_matmul_peak_is_positive_and_finite() -> None:
    peak = measure_matmul_peak(size=256, repeats=2)
    assert math.isfinite(peak) and peak > 0
    assert math.isfinite(measure_matmul_peak(torch.float64, size=128, repeats=1, device="cpu"))
