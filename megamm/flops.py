"""Model FLOPs and parameter counts from config shapes, model FLOPs utilisation (MFU), and a
matmul peak probe.

FLOPs convention (PaLM appendix B / Megatron-LM "model FLOPs"): only matrix multiplications
are counted, a multiply-add being 2 FLOPs, so a product (m x k) @ (k x n) costs ``2 * m * k * n``.
Not counted: embedding lookups, position additions, LayerNorm, softmax, GELU, biases, gates,
the L2 normalisation, the temperature scaling, masking, cross-entropy, the optimizer step, the
short-time Fourier transform of the audio encoder (an FFT, not a matmul; ``FlopCounterMode``
does not count ``torch.stft`` either), and any recomputation (activation checkpointing does not
change *model* FLOPs). The audio encoder's mel filterbank *is* a matmul and is counted.

Attention is counted over all query-key pairs, padding included and causal masks ignored
(``4 * Tq * Tk * H`` per attention layer), because that is what the kernels compute: the key
padding mask only hides keys from the softmax, and a causal mask does not skip the hidden half.
Every tower is counted with the dense kernel whatever ``attention.kind`` says: for the
``local``, ``block_sparse`` and ``linear`` kernels the count is an upper bound.

Sequence lengths are the padded maxima the model computes over: ``text.max_length`` for
captions, questions and answers (the data pipeline pads them to it), ``(S / P)^2 + 1`` image
tokens, and the audio of ``audio.max_seconds`` (:func:`audio_frames`; pass ``audio_samples`` to
count a shorter padded batch).

What runs per sample depends on ``model.objectives`` (see ``megamm/model/multimodal.py``):

- the encoders and projections always (image and text; audio with ``audio.enabled``);
- the contrastive logits of every pair with a weight above 0;
- with fusion or decoder: the context projections of every image and audio token to the text width;
- captioning: the decoder over the caption (``T - 1`` input tokens, teacher-forced) attending
  to the concatenated image and audio tokens;
- image-text matching: the hard-negative similarities (local batch x local batch, without
  gradient), then the fusion and the ITM head on 3 rows per sample (the positive pair, a
  hard-negative caption, a hard-negative image);
- VQA: the text encoder again on the question, the fusion on it, the VQA head (``vqa``) and the
  decoder over the answer attending to the fused question (``vqa_generative``).

Training is counted as 3 x forward (backward = 2 x forward: one matmul for the input gradient
and one for the weight gradient of every forward matmul), the standard MFU convention, except
for the matmuls that run without gradient (the mel filterbank, whose input is the waveform and
whose weights are a fixed buffer, and the ITM similarities, under ``no_grad``): they count once
(:attr:`FlopCount.without_backward`). The backward really executed also skips the input gradient
of the image and audio patch embeddings (pixels and spectrograms need no gradient), so autograd
runs ``training - image_patch_embedding - audio_patch_embedding`` matmul FLOPs;
``tests/test_flops.py`` checks both numbers against ``torch.utils.flop_counter``.

The counts are of the whole (unsharded) model per sample: tensor parallelism splits the same
FLOPs over ranks and ZeRO does not change them. For MFU, pass the throughput and the peak of
the same set of devices, e.g. global samples/s and ``world_size * per-device peak``.

:func:`count_parameters` counts the trainable parameters of ``MultiModalTransformer(config)``
by component, from the config alone (no model is built).

This module belongs to the ``config`` layer: it imports only :mod:`megamm.config` and the
standard library (``torch`` is imported lazily, inside :func:`measure_matmul_peak` only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from megamm.config import (
    CONTRASTIVE_PAIRS,
    AudioConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    TransformerConfig,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

TRAINING_MULTIPLIER = 3
"""Training FLOPs = TRAINING_MULTIPLIER x forward FLOPs (forward + a backward of 2 x forward)."""

FUSION_TASKS = ("itm", "vqa")
"""The tasks the ``weighted`` fusion keeps a set of weights for (``megamm.model.fusion.encoder.TASKS``)."""

ITM_ROWS_PER_SAMPLE = 3
"""Image-text matching fuses 3 pairs per sample: the positive and two hard negatives."""


# ----------------------------------------------------------------------------------------------
# Elementary counts


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m x k) @ (k x n): ``2 * m * k * n`` (one multiply and one add per term)."""
    return 2 * m * k * n


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """FLOPs of a Linear(in -> out) applied to ``tokens`` rows: ``2 * T * in * out`` (bias not counted)."""
    return matmul_flops(tokens, in_features, out_features)


def attention_core_flops(tokens: int, hidden: int, keys: Optional[int] = None) -> int:
    """FLOPs of the attention scores and weighted values of one sequence, all heads together.

    Per head of width d = H / heads, with Tq = ``tokens`` queries and Tk = ``keys`` keys (default
    Tq: self-attention): scores Q K^T (Tq x d) @ (d x Tk) -> 2 * Tq * Tk * d, and weighted values
    P V (Tq x Tk) @ (Tk x d) -> 2 * Tq * Tk * d. Summed over heads (heads * d = H):
    ``4 * Tq * Tk * H``, independent of the head count.
    """
    keys = tokens if keys is None else keys
    return 2 * matmul_flops(tokens, hidden, keys)


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


def cross_attention_flops(tokens: int, keys: int, hidden: int, context: int) -> int:
    """Forward FLOPs of a cross-attention layer: ``tokens`` queries of width H over ``keys``
    context tokens of width Hc = ``context``.

    - query and output projections, Linear(H, H) on Tq rows:  ``2 * 2 * Tq * H * H``
    - stacked key/value projection, Linear(Hc, 2H) on Tk rows: ``2 * Tk * Hc * 2H``
    - scores and weighted values:                              ``4 * Tq * Tk * H``
    """
    projections = 2 * linear_flops(tokens, hidden, hidden) + linear_flops(keys, context, 2 * hidden)
    return projections + attention_core_flops(tokens, hidden, keys)


def decoder_block_flops(tokens: int, keys: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of one decoder block: causal self-attention (counted dense, as computed),
    cross-attention to ``keys`` context tokens of the same width, MLP."""
    return transformer_block_flops(tokens, hidden, ffn) + cross_attention_flops(tokens, keys, hidden, hidden)


def tower_flops(tower: TransformerConfig, tokens: int) -> int:
    """Forward FLOPs of ``tower.num_layers`` blocks on one sequence (the final LayerNorm is free)."""
    return tower.num_layers * transformer_block_flops(tokens, tower.hidden_size, tower.ffn_size)


# ----------------------------------------------------------------------------------------------
# Sequence lengths


def image_num_patches(image: ImageConfig) -> int:
    """Patches per image: ``(S / P)^2``."""
    return (image.image_size // image.patch_size) ** 2


def image_tokens(image: ImageConfig) -> int:
    """Image sequence length: the patches plus the class token, ``(S / P)^2 + 1``."""
    return image_num_patches(image) + 1


def text_tokens(text: TextConfig) -> int:
    """Text sequence length: the padded ``max_length`` (the model computes over padding)."""
    return text.max_length


def audio_frames(audio: AudioConfig, samples: Optional[int] = None) -> int:
    """Spectrogram frames of a (padded) waveform of ``samples`` samples, ``1 + S // hop_length``;
    by default of the longest the encoder takes (``audio.max_samples``), i.e. ``audio.max_frames``."""
    samples = audio.max_samples if samples is None else samples
    if samples < 1:
        raise ValueError(f"audio samples must be >= 1, got {samples}")
    frames = 1 + samples // audio.hop_length
    if frames > audio.max_frames:
        raise ValueError(
            f"{samples} audio samples give {frames} frames, more than the encoder's max_frames={audio.max_frames} "
            f"(model.audio.max_seconds={audio.max_seconds}); count at most {audio.max_samples} samples"
        )
    return frames


def audio_num_patches(audio: AudioConfig, frames: Optional[int] = None) -> int:
    """Patches of a spectrogram of ``frames`` frames (default ``audio.max_frames``):
    ``ceil(frames / patch_time) * (n_mels / patch_frequency)``."""
    frames = audio.max_frames if frames is None else frames
    return -(-frames // audio.patch_time) * (audio.n_mels // audio.patch_frequency)


def audio_tokens(audio: AudioConfig, frames: Optional[int] = None) -> int:
    """Audio sequence length: the patches plus the class token."""
    return audio_num_patches(audio, frames) + 1


def audio_frequency_bins(audio: AudioConfig) -> int:
    """Bins of the power spectrum the mel filterbank reads: ``n_fft // 2 + 1``."""
    return audio.n_fft // 2 + 1


def context_tokens(config: ModelConfig, audio_samples: Optional[int] = None) -> dict[str, int]:
    """Tokens of every context modality (image, and audio when enabled) the fusion and decoder
    attend to, class tokens included."""
    tokens = {"image": image_tokens(config.image)}
    if config.audio.enabled:
        tokens["audio"] = audio_tokens(config.audio, audio_frames(config.audio, audio_samples))
    return tokens


# ----------------------------------------------------------------------------------------------
# Fusion and decoder


def fusion_flops(config: ModelConfig, text: int, context: dict[str, int]) -> tuple[int, int]:
    """Forward FLOPs of one row through the fusion encoder (``config.fusion.kind``), and the length
    of its token output (what a decoder then attends to).

    ``text``: the text stream's tokens; ``context``: tokens per context modality. H is the text
    width, F the fusion's MLP width, M the number of modalities (text included), Tk = sum of the
    context tokens.

    - gated: ``num_layers`` blocks on T tokens, plus at every ``every``-th one a cross-attention
      to the Tk joined context tokens and an MLP; output T tokens.
    - bottleneck: per layer, each modality's block on (its tokens + ``bottleneck_tokens``);
      output T + Nb tokens.
    - concat: Linear(M * H + M, F) and Linear(F, H) on the pooled vectors; output T + Tk tokens
      (the text and context tokens, unfused).
    - weighted: the weighted sum of M pooled vectors, a (1 x M) @ (M x H) product per row;
      output T + Tk tokens.
    """
    fusion, hidden = config.fusion, config.text.hidden_size
    ffn = fusion.ffn_size(hidden)
    joined = sum(context.values())
    modalities = 1 + len(context)
    if fusion.kind == "gated":
        gated = sum(1 for index in range(fusion.num_layers) if (index + 1) % fusion.every == 0)
        blocks = fusion.num_layers * transformer_block_flops(text, hidden, ffn)
        cross = gated * (
            cross_attention_flops(text, joined, hidden, hidden)  # (T, H) over (Tk, H)
            + linear_flops(text, hidden, ffn)
            + linear_flops(text, ffn, hidden)  # the gated MLP
        )
        return blocks + cross, text
    if fusion.kind == "bottleneck":
        extra = fusion.bottleneck_tokens
        per_layer = sum(transformer_block_flops(tokens + extra, hidden, ffn) for tokens in (text, *context.values()))
        return fusion.num_layers * per_layer, text + extra
    if fusion.kind == "concat":
        features = modalities * hidden + modalities  # pooled vectors and presence indicators
        return linear_flops(1, features, ffn) + linear_flops(1, ffn, hidden), text + joined
    if fusion.kind == "weighted":
        return matmul_flops(1, modalities, hidden), text + joined  # (1, M) @ (M, H)
    raise ValueError(f"model.fusion.kind={fusion.kind!r} is not one of gated, bottleneck, concat, weighted")


def decoder_flops(config: ModelConfig, tokens: int, keys: int) -> int:
    """Forward FLOPs of one row through the text decoder: ``tokens`` input tokens (teacher forcing
    reads all but the last of a sequence) attending to ``keys`` context tokens of the text width,
    then the tied LM head, Linear(H, V) on every position."""
    hidden = config.text.hidden_size
    decoder = config.decoder
    blocks = decoder.num_layers * decoder_block_flops(tokens, keys, hidden, decoder.ffn_size(hidden))
    return blocks + linear_flops(tokens, hidden, config.text.vocab_size)


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
    """Forward + backward FLOPs per sample: ``3 * forward``, less twice the components in
    :attr:`without_backward` (they run once)."""
    breakdown: dict[str, int] = field(default_factory=dict, hash=False)
    """Forward FLOPs per component: image_patch_embedding, image_blocks, text_blocks,
    projections, contrastive_logits (with a global batch), and for the whole model
    audio_spectrogram, audio_patch_embedding, audio_blocks, context_projections,
    caption_decoder, itm_similarity, itm_fusion, itm_head, question_blocks, vqa_fusion,
    vqa_head, answer_decoder, for the parts the config builds and runs."""
    without_backward: tuple[str, ...] = ()
    """Keys of ``breakdown`` that run without gradient (no backward): audio_spectrogram (the mel
    filterbank), itm_similarity (the hard-negative mining)."""

    @property
    def backward(self) -> int:
        """Backward FLOPs per sample, ``training - forward``."""
        return self.training - self.forward


def _check_batch(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def model_flops_per_sample(
    model_config: ModelConfig,
    *,
    global_batch: Optional[int] = None,
    micro_batch: Optional[int] = None,
    audio_samples: Optional[int] = None,
) -> FlopCount:
    """Matmul FLOPs per sample of ``MultiModalTransformer(model_config)``'s training forward pass.

    With S = image_size, P = patch_size, C = channels, N = (S/P)^2 + 1 image tokens, T =
    text max_length, E = embed_dim, B_g = ``global_batch``, and per tower H, F = ffn_size, L:

    - image_patch_embedding: ``2 * (S/P)^2 * (C*P*P) * H_img``  (the class token is not projected)
    - image_blocks:          ``L_img * transformer_block_flops(N, H_img, F_img)``
    - text_blocks:           ``L_txt * transformer_block_flops(T, H_txt, F_txt)``  (padding included;
      the token embedding is a lookup, not a matmul)
    - projections:           ``2 * H_img * E + 2 * H_txt * E`` (``+ 2 * H_aud * E`` with audio):
      pooled features -> embedding space
    - contrastive_logits:    ``2 * 2 * E * B_g`` per contrastive pair: each sample's row of one
      modality scores all B_g rows of the other, both ways. Omitted (no key in ``breakdown``)
      when ``global_batch`` is None, because it depends on the batch.

    With audio (K = n_fft // 2 + 1 bins, R frames, :func:`audio_frames`, Na audio tokens):

    - audio_spectrogram:     ``2 * n_mels * K * R`` (the mel filterbank; no backward)
    - audio_patch_embedding: ``2 * (Na - 1) * (pf * pt) * H_aud``
    - audio_blocks:          ``L_aud * transformer_block_flops(Na, H_aud, F_aud)``

    With a fusion or decoder objective, per context modality m with Nm tokens:
    context_projections ``2 * Nm * H_m * H_txt``; then captioning (caption_decoder:
    :func:`decoder_flops` on T - 1 tokens over the joined context), image-text matching
    (itm_similarity ``2 * E * B_micro``, no backward; itm_fusion 3 x :func:`fusion_flops`;
    itm_head 3 x (Linear(H, H) + Linear(H, 2))), VQA (question_blocks: the text tower again;
    vqa_fusion :func:`fusion_flops`; vqa_head Linear(H, 2H) + Linear(2H, A); answer_decoder
    :func:`decoder_flops` on T - 1 tokens over the fusion's token output).

    ``micro_batch``: the per-rank batch the ITM hard negatives are mined in (default
    ``global_batch``: one process); itm_similarity is omitted when both are None.
    ``audio_samples``: the padded waveform length to count (default: ``audio.max_seconds``).
    """
    _check_batch("global_batch", global_batch)
    _check_batch("micro_batch", micro_batch)
    micro_batch = global_batch if micro_batch is None else micro_batch
    cfg = model_config
    image, text, audio, embed = cfg.image, cfg.text, cfg.audio, cfg.embed_dim
    objectives = cfg.objectives
    hidden = text.hidden_size
    patch_features = image.channels * image.patch_size * image.patch_size
    breakdown: dict[str, int] = {
        # (N-1, C*P*P) @ (C*P*P, H_img)
        "image_patch_embedding": linear_flops(image_num_patches(image), patch_features, image.hidden_size),
        # L x block on (N, H_img)
        "image_blocks": tower_flops(image, image_tokens(image)),
        # L x block on (T, H_txt)
        "text_blocks": tower_flops(text, text_tokens(text)),
    }
    projections = linear_flops(1, image.hidden_size, embed) + linear_flops(1, text.hidden_size, embed)
    if audio.enabled:
        frames = audio_frames(audio, audio_samples)
        # (n_mels, K) @ (K, R)
        breakdown["audio_spectrogram"] = matmul_flops(audio.n_mels, audio_frequency_bins(audio), frames)
        # (Na-1, pf*pt) @ (pf*pt, H_aud)
        breakdown["audio_patch_embedding"] = linear_flops(
            audio_num_patches(audio, frames), audio.patch_frequency * audio.patch_time, audio.hidden_size
        )
        breakdown["audio_blocks"] = tower_flops(audio, audio_tokens(audio, frames))
        projections += linear_flops(1, audio.hidden_size, embed)
    # (1, H) @ (H, E) per modality
    breakdown["projections"] = projections
    pairs = [pair for pair in CONTRASTIVE_PAIRS if getattr(objectives, pair) > 0]
    if global_batch is not None and pairs:
        # (1, E) @ (E, B_g) both ways, per pair
        breakdown["contrastive_logits"] = len(pairs) * 2 * matmul_flops(1, embed, global_batch)

    if cfg.uses_fusion or cfg.uses_decoder:
        context = context_tokens(cfg, audio_samples)
        widths = {"image": image.hidden_size, "audio": audio.hidden_size}
        # (Nm, H_m) @ (H_m, H_txt) per context modality
        breakdown["context_projections"] = sum(linear_flops(n, widths[m], hidden) for m, n in context.items())
        joined = sum(context.values())
        decoder_tokens = text.max_length - 1  # teacher forcing reads ids[:, :-1]
        if objectives.captioning > 0:
            breakdown["caption_decoder"] = decoder_flops(cfg, decoder_tokens, joined)
        if objectives.itm > 0:
            if micro_batch is not None:
                # (1, E) @ (E, B): this sample's image against the rank's captions, without gradient
                breakdown["itm_similarity"] = matmul_flops(1, embed, micro_batch)
            fused, _ = fusion_flops(cfg, text.max_length, context)
            breakdown["itm_fusion"] = ITM_ROWS_PER_SAMPLE * fused
            head = linear_flops(1, hidden, hidden) + linear_flops(1, hidden, 2)  # (1, H) -> (1, H) -> (1, 2)
            breakdown["itm_head"] = ITM_ROWS_PER_SAMPLE * head
        if cfg.uses_questions:
            breakdown["question_blocks"] = tower_flops(text, text.max_length)
            fused, fused_tokens = fusion_flops(cfg, text.max_length, context)
            breakdown["vqa_fusion"] = fused
            if objectives.vqa > 0:  # (1, H) -> (1, 2H) -> (1, A)
                breakdown["vqa_head"] = linear_flops(1, hidden, 2 * hidden) + linear_flops(
                    1, 2 * hidden, objectives.num_answers
                )
            if objectives.vqa_generative > 0:
                breakdown["answer_decoder"] = decoder_flops(cfg, decoder_tokens, fused_tokens)

    without_backward = tuple(key for key in ("audio_spectrogram", "itm_similarity") if key in breakdown)
    forward = sum(breakdown.values())
    training = TRAINING_MULTIPLIER * forward - (TRAINING_MULTIPLIER - 1) * sum(breakdown[k] for k in without_backward)
    return FlopCount(forward=forward, training=training, breakdown=breakdown, without_backward=without_backward)


# ----------------------------------------------------------------------------------------------
# Parameters


def layer_norm_parameters(hidden: int) -> int:
    """LayerNorm(H): weight and bias, ``2 * H``."""
    return 2 * hidden


def linear_parameters(in_features: int, out_features: int, bias: bool = True) -> int:
    """Linear(in -> out): ``in * out`` (+ ``out`` with a bias)."""
    return in_features * out_features + (out_features if bias else 0)


def transformer_block_parameters(hidden: int, ffn: int) -> int:
    """A pre-norm block: two LayerNorms, Q/K/V Linear(H, 3H), output Linear(H, H), MLP
    Linear(H, F) and Linear(F, H), all with biases: ``12 H^2``-ish for F = 4H."""
    attention = linear_parameters(hidden, 3 * hidden) + linear_parameters(hidden, hidden)
    mlp = linear_parameters(hidden, ffn) + linear_parameters(ffn, hidden)
    return 2 * layer_norm_parameters(hidden) + attention + mlp


def cross_attention_parameters(hidden: int, context: int) -> int:
    """Cross-attention: query Linear(H, H), stacked key/value Linear(Hc, 2H), output Linear(H, H)."""
    return linear_parameters(hidden, hidden) + linear_parameters(context, 2 * hidden) + linear_parameters(hidden, hidden)


def stack_parameters(tower: TransformerConfig) -> int:
    """A tower's blocks and final LayerNorm."""
    return tower.num_layers * transformer_block_parameters(tower.hidden_size, tower.ffn_size) + layer_norm_parameters(
        tower.hidden_size
    )


def fusion_parameters(config: ModelConfig) -> int:
    """The fusion encoder of ``config.fusion.kind`` at the text width (see :func:`fusion_flops`)."""
    fusion, hidden = config.fusion, config.text.hidden_size
    ffn = fusion.ffn_size(hidden)
    modalities = len(config.modalities)
    if fusion.kind == "gated":
        gated = sum(1 for index in range(fusion.num_layers) if (index + 1) % fusion.every == 0)
        gated_block = (
            2 * layer_norm_parameters(hidden)
            + cross_attention_parameters(hidden, hidden)
            + linear_parameters(hidden, ffn)
            + linear_parameters(ffn, hidden)
            + 2  # the tanh gates
        )
        blocks = fusion.num_layers * transformer_block_parameters(hidden, ffn)
        return blocks + gated * gated_block + layer_norm_parameters(hidden)
    if fusion.kind == "bottleneck":
        tokens = fusion.bottleneck_tokens * hidden
        blocks = fusion.num_layers * modalities * transformer_block_parameters(hidden, ffn)
        return tokens + blocks + layer_norm_parameters(hidden)
    if fusion.kind == "concat":
        features = modalities * hidden + modalities
        return linear_parameters(features, ffn) + linear_parameters(ffn, hidden)
    if fusion.kind == "weighted":
        return len(FUSION_TASKS) * modalities
    raise ValueError(f"model.fusion.kind={fusion.kind!r} is not one of gated, bottleneck, concat, weighted")


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Trainable parameters of ``MultiModalTransformer(config)`` by component, from the config alone.

    Components (present when the config builds them): text_encoder (token and position
    embeddings, blocks, final norm), image_encoder (patch embedding, class token, positions,
    blocks, final norm), audio_encoder (likewise; the spectrogram's window and filterbank are
    buffers, not parameters), projections (into the embedding space, no bias),
    contrastive_temperatures (one per contrastive head), context_projections (LayerNorm + Linear
    per context modality), fusion, itm_head, vqa_head, decoder (token and position embeddings,
    blocks, final norm; the LM head is tied to the token embedding). Their sum is the model's
    ``sum(p.numel() for p in model.parameters())`` at tensor-parallel size 1.
    """
    image, text, audio, objectives = config.image, config.text, config.audio, config.objectives
    hidden = text.hidden_size
    positions = text.max_length * hidden if text.positions == "learned" else 0
    counts: dict[str, int] = {
        "text_encoder": text.vocab_size * hidden + positions + stack_parameters(text),
    }
    patch_features = image.channels * image.patch_size * image.patch_size
    counts["image_encoder"] = (
        linear_parameters(patch_features, image.hidden_size)
        + image.hidden_size  # class token
        + image_tokens(image) * image.hidden_size  # positions
        + stack_parameters(image)
    )
    if audio.enabled:
        counts["audio_encoder"] = (
            linear_parameters(audio.patch_frequency * audio.patch_time, audio.hidden_size)
            + audio.hidden_size  # class token
            + audio_tokens(audio) * audio.hidden_size  # positions for max_frames
            + stack_parameters(audio)
        )
    widths = {"text": hidden, "image": image.hidden_size, "audio": audio.hidden_size}
    counts["projections"] = sum(linear_parameters(widths[m], config.embed_dim, bias=False) for m in config.modalities)
    heads = sum(1 for pair in CONTRASTIVE_PAIRS if getattr(objectives, pair) > 0)
    if objectives.image_text == 0 and objectives.itm > 0:
        heads += 1  # the image-text temperature scales the hard-negative similarities
    counts["contrastive_temperatures"] = heads
    if config.uses_fusion or config.uses_decoder:
        counts["context_projections"] = sum(
            layer_norm_parameters(widths[m]) + linear_parameters(widths[m], hidden)
            for m in config.modalities
            if m != "text"
        )
    if config.uses_fusion:
        counts["fusion"] = fusion_parameters(config)
    if objectives.itm > 0:
        counts["itm_head"] = linear_parameters(hidden, hidden) + linear_parameters(hidden, 2)
    if objectives.vqa > 0:
        counts["vqa_head"] = linear_parameters(hidden, 2 * hidden) + linear_parameters(2 * hidden, objectives.num_answers)
    if config.uses_decoder:
        decoder = config.decoder
        ffn = decoder.ffn_size(hidden)
        block = (
            transformer_block_parameters(hidden, ffn)
            + layer_norm_parameters(hidden)
            + cross_attention_parameters(hidden, hidden)
        )
        decoder_positions = text.max_length * hidden if decoder.positions == "learned" else 0
        counts["decoder"] = (
            text.vocab_size * hidden + decoder_positions + decoder.num_layers * block + layer_norm_parameters(hidden)
        )
    return counts


def total_parameters(config: ModelConfig) -> int:
    """``sum(count_parameters(config).values())``: every trainable parameter of the model."""
    return sum(count_parameters(config).values())


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
