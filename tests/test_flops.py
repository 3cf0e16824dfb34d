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

The whole model (audio encoder, every fusion kind, decoder, every objective) is checked the
same way with the math backend, exactly: forward == counter, and forward + backward == training
less the patch embeddings' input gradients (image and audio). The counter also sees the VQA head
run a second time (the reported ``vqa_logits``, without gradient), which model FLOPs count once.
``count_parameters`` equals ``sum(p.numel())`` of built models; the base and large recipes are
counted, never built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from megamm.config import FUSION_KINDS, ConfigError, ImageConfig, ModelConfig, TextConfig, load_config
from megamm.flops import (
    FlopCount,
    audio_frames,
    count_parameters,
    image_tokens,
    measure_matmul_peak,
    mfu,
    model_flops_per_sample,
    total_parameters,
    transformer_block_flops,
)


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
# The whole model: audio encoder, fusion, decoder and every objective


def _whole(kind: str = "gated", *extra: str) -> ModelConfig:
    """The whole model, small: every width, depth and MLP ratio differs so that mix-ups show."""
    overrides = [
        "model.embed_dim=16",
        "model.text.vocab_size=64", "model.text.max_length=8", "model.text.hidden_size=32",
        "model.text.num_layers=1", "model.text.num_heads=2",
        "model.image.image_size=16", "model.image.patch_size=4", "model.image.hidden_size=48",
        "model.image.num_layers=1", "model.image.num_heads=2",
        "model.audio.hidden_size=40", "model.audio.num_layers=1", "model.audio.num_heads=2",
        "model.audio.n_mels=16", "model.audio.patch_frequency=8", "model.audio.patch_time=4",
        "model.audio.max_seconds=0.3", "data.max_audio_seconds=0.3",
        f"model.fusion.kind={kind}", "model.fusion.num_layers=2", "model.fusion.num_heads=2",
        "model.fusion.mlp_ratio=3.0", "model.fusion.bottleneck_tokens=3",
        "model.decoder.num_layers=1", "model.decoder.num_heads=2", "model.decoder.mlp_ratio=2.0",
        "model.objectives.num_answers=5",
        "data.image_size=16", "data.max_text_length=8",
        *extra,
    ]  # fmt: skip
    return load_config("tiny", overrides).model


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread: these models are tiny, and on a busy 2-core machine more threads
    make every small matmul wait for the other (seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PARAMETER_CASES = [
    pytest.param(lambda: load_config("clip_tiny").model, id="clip_tiny"),
    pytest.param(lambda: load_config("tiny").model, id="tiny"),
    *[pytest.param(lambda kind=kind: _whole(kind), id=f"fusion-{kind}") for kind in FUSION_KINDS],
    pytest.param(
        lambda: _whole("gated", "model.fusion.every=2", "model.text.positions=rotary", "model.decoder.positions=rotary"),
        id="gated-every-2-rotary",
    ),
    pytest.param(
        lambda: _whole("bottleneck", "model.audio.enabled=false", "model.objectives.image_text=0",
                       "model.objectives.audio_text=0", "model.objectives.image_audio=0",
                       "model.objectives.captioning=0", "model.objectives.vqa_generative=0"),
        id="itm-vqa-only-no-audio",
    ),  # fmt: skip
    pytest.param(
        lambda: _whole("gated", "model.objectives.itm=0", "model.objectives.vqa=0", "model.objectives.vqa_generative=0"),
        id="captioning-no-fusion",
    ),
]


@pytest.mark.parametrize("make_config", PARAMETER_CASES)
def test_count_parameters_matches_built_model(make_config: Any) -> None:
    from megamm.model import MultiModalTransformer

    config = make_config()
    model = MultiModalTransformer(config, seed=0)
    built = sum(p.numel() for p in model.parameters())
    counted = count_parameters(config)
    assert sum(counted.values()) == total_parameters(config) == built
    # component by component, against the model's own modules
    own = {
        "text_encoder": model.text_encoder,
        "image_encoder": model.image_encoder,
        "audio_encoder": model.audio_encoder,
        "fusion": model.fusion,
        "decoder": model.decoder,
        "context_projections": getattr(model, "context_projection", None),
        "itm_head": getattr(model, "itm_head", None),
        "vqa_head": getattr(model, "vqa_head", None),
    }
    for name, module in own.items():
        expected = None if module is None else sum(p.numel() for p in module.parameters())
        assert counted.get(name) == expected, name


def _whole_inputs(config: ModelConfig, batch: int, partial: bool, audio_samples: Optional[int]) -> dict[str, Any]:
    """A training batch with every modality and a question-answer pair in every row."""
    length = config.text.max_length
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.text.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)  # (B, T), True = real token
    samples = config.audio.max_samples if audio_samples is None else audio_samples
    lengths = torch.full((batch,), samples)
    if partial:
        mask = torch.arange(length)[None, :] < (torch.arange(batch) % (length - 2) + 3)[:, None]
        lengths = samples - 97 * torch.arange(batch)  # shorter clips padded to the longest
    image = config.image
    inputs = {
        "image": torch.randn(batch, image.channels, image.image_size, image.image_size, generator=generator),
        "text_ids": ids,
        "text_mask": mask,
        "question_ids": ids.flip(0),
        "question_mask": mask.flip(0),
        "answer": torch.arange(batch) % config.objectives.num_answers,
        "answer_ids": ids.roll(1, 0),
        "answer_mask": mask.roll(1, 0),
    }
    if config.audio.enabled:
        inputs["audio"] = 0.1 * torch.randn(batch, samples, generator=generator)  # (B, S)
        inputs["audio_lengths"] = lengths
    return inputs


def _counted_whole(
    config: ModelConfig, batch: int, backward: bool, attention: str = "math", partial: bool = False,
    audio_samples: Optional[int] = None,
) -> float:  # fmt: skip
    """FLOPs per sample FlopCounterMode counts for one training forward (and backward) pass."""
    from megamm.model import MultiModalTransformer

    model = MultiModalTransformer(config, seed=0)
    inputs = _whole_inputs(config, batch, partial, audio_samples)
    mapping: Optional[dict[Any, Any]] = CPU_SDPA_FORMULAS if attention == "mapped" else None
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    backends = [SDPBackend.MATH] if attention == "math" else [SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends), counter:
        out = model(**inputs)
        if backward:
            out["loss"].backward()
    assert set(out.losses) == {name for name, weight in config.objectives.weights().items() if weight > 0}
    return counter.get_total_flops() / batch


WHOLE_CASES = [
    *[pytest.param(kind, 3, False, None, id=kind) for kind in FUSION_KINDS],
    pytest.param("gated", 4, True, 2400, id="gated-partial-masks-short-audio"),
    pytest.param("bottleneck", 2, True, 1000, id="bottleneck-partial-masks-short-audio"),
]


@pytest.mark.parametrize("kind, batch, partial, audio_samples", WHOLE_CASES)
def test_whole_model_forward_matches_flop_counter(
    one_thread: Any, kind: str, batch: int, partial: bool, audio_samples: Optional[int]
) -> None:
    config = _whole(kind)
    count = model_flops_per_sample(config, global_batch=batch, audio_samples=audio_samples)
    counted = _counted_whole(config, batch, backward=False, partial=partial, audio_samples=audio_samples)
    assert counted == count.forward


@pytest.mark.parametrize("kind, batch, partial, audio_samples", WHOLE_CASES)
def test_whole_model_training_matches_flop_counter(
    one_thread: Any, kind: str, batch: int, partial: bool, audio_samples: Optional[int]
) -> None:
    config = _whole(kind)
    count = model_flops_per_sample(config, global_batch=batch, audio_samples=audio_samples)
    assert set(count.without_backward) == {"audio_spectrogram", "itm_similarity"}
    # Autograd computes no input gradient for the patch embeddings (pixels, spectrogram).
    expected = count.training - count.breakdown["image_patch_embedding"] - count.breakdown["audio_patch_embedding"]
    counted = _counted_whole(config, batch, backward=True, partial=partial, audio_samples=audio_samples)
    assert counted == expected


def test_tiny_recipe_matches_flop_counter(one_thread: Any) -> None:
    """The quickstart recipe as shipped, with the default CPU attention kernel mapped to torch's
    SDPA formula (forward: the same as the math backend's)."""
    config, batch = load_config("tiny").model, 2
    count = model_flops_per_sample(config, global_batch=batch)
    counted = _counted_whole(config, batch, backward=False, attention="mapped")
    assert counted == count.forward
    assert count.breakdown["audio_blocks"] == 2 * transformer_block_flops(29, 64, 256)  # 7 x 4 patches + class


def test_spectrogram_counts_the_mel_filterbank_not_the_fft() -> None:
    """FlopCounterMode counts the mel filterbank's matmul and not torch.stft (an FFT): so does
    megamm.flops (audio_spectrogram)."""
    from megamm.model.encoders import LogMelSpectrogram

    audio = _whole().audio
    spectrogram = LogMelSpectrogram(audio.sample_rate, audio.n_fft, audio.hop_length, audio.n_mels)
    waveform = 0.1 * torch.randn(3, audio.max_samples)
    counter = FlopCounterMode(display=False)
    with counter:
        mel, _ = spectrogram(waveform)
    assert mel.shape[-1] == audio_frames(audio) == audio.max_frames
    count = model_flops_per_sample(_whole())
    expected = 2 * audio.n_mels * (audio.n_fft // 2 + 1) * audio.max_frames
    assert counter.get_total_flops() / 3 == count.breakdown["audio_spectrogram"] == expected
    stft_only = FlopCounterMode(display=False)
    with stft_only:
        torch.stft(waveform, audio.n_fft, audio.hop_length, window=torch.hann_window(audio.n_fft), return_complex=True)
    assert stft_only.get_total_flops() == 0


def test_whole_model_batch_and_audio_arguments() -> None:
    config = _whole("gated")
    without = model_flops_per_sample(config)
    assert "contrastive_logits" not in without.breakdown and "itm_similarity" not in without.breakdown
    count = model_flops_per_sample(config, global_batch=64, micro_batch=8)
    e = config.embed_dim
    assert count.breakdown["contrastive_logits"] == 3 * 2 * 2 * e * 64  # three pairs, both ways
    assert count.breakdown["itm_similarity"] == 2 * e * 8  # mined within the rank's batch
    assert count.training == 3 * count.forward - 2 * (count.breakdown["audio_spectrogram"] + 2 * e * 8)
    assert model_flops_per_sample(config, global_batch=8).breakdown["itm_similarity"] == 2 * e * 8
    shorter = model_flops_per_sample(config, audio_samples=1600)  # 11 frames -> 3 time patches
    assert shorter.breakdown["audio_blocks"] == transformer_block_flops(3 * 2 + 1, 40, 160)
    with pytest.raises(ValueError, match="max_frames"):
        model_flops_per_sample(config, audio_samples=config.audio.max_samples + config.audio.hop_length)
    with pytest.raises(ValueError, match="micro_batch"):
        model_flops_per_sample(config, micro_batch=0)
    # the dual encoder's count does not move when the whole-model parts are off
    assert set(model_flops_per_sample(load_config("clip_tiny").model, global_batch=4).breakdown) == {
        "image_patch_embedding", "image_blocks", "text_blocks", "projections", "contrastive_logits",
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The base and large recipes (counted, never built)

RECIPE_SIZES = {"base": (180e6, 240e6), "large": (0.9e9, 1.1e9)}
"""Parameter ranges the recipes promise: about 200M and about 1B."""


@pytest.mark.parametrize("name", sorted(RECIPE_SIZES))
def test_recipe_loads_validates_and_has_its_size(name: str) -> None:
    config = load_config(name)
    model = config.model
    config.validate()
    assert config.data.image_size == model.image.image_size == 224
    assert config.data.max_text_length == model.text.max_length
    assert model.audio.enabled and model.uses_fusion and model.uses_decoder
    assert model.text.vocab_size % 8 == 0
    low, high = RECIPE_SIZES[name]
    counts = count_parameters(model)
    assert low <= sum(counts.values()) <= high
    assert set(counts) >= {"text_encoder", "image_encoder", "audio_encoder", "fusion", "decoder"}
    assert 0 < model_flops_per_sample(model, global_batch=1024).training < 1e13


def test_recipes_tensor_parallel_sizes() -> None:
    load_config("large", ["parallel.tensor_parallel=8"])  # every stack has 16 heads
    load_config("base", ["parallel.tensor_parallel=4"])
    with pytest.raises(ConfigError, match="model.image.num_heads=12"):
        load_config("base", ["parallel.tensor_parallel=8"])  # ViT-B/16 has 12 heads


def test_base_image_tower_is_vit_b16() -> None:
    """ViT-B/16 at 224 px as published: timm's vit_base_patch16_224 has 86,567,656 parameters,
    less its 1000-class head (768 x 1000 + 1000) that is 85,798,656; 17.6 GMACs (35.1 GFLOPs) forward."""
    model = load_config("base").model
    assert image_tokens(model.image) == 197
    assert count_parameters(model)["image_encoder"] == 86_567_656 - (768 * 1000 + 1000)
    count = model_flops_per_sample(model)
    image = count.breakdown["image_patch_embedding"] + count.breakdown["image_blocks"]
    assert image == pytest.approx(2 * 17.56e9, rel=0.01)


def test_model_sizes_page_and_readme_are_current() -> None:
    """docs/model_sizes.md and the README's table are tools/model_sizes.py's output for today's
    recipes and counters: rerun the tool after changing either."""
    from tools.model_sizes import RECIPES, markdown_table, page, recipe_size

    root = Path(__file__).resolve().parents[1]
    rows = [recipe_size(recipe) for recipe in RECIPES]
    assert (root / "docs" / "model_sizes.md").read_text() == page(rows)
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Model recipes") : readme.index("## Parallel layouts")]
    assert markdown_table(rows) in section


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
