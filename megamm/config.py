"""Typed, nested configuration for megamm.

A run's configuration is built in three layers, each overriding the last:

1. the dataclass defaults below,
2. a YAML recipe (a name from ``megamm/configs/`` such as ``tiny``, or a path),
3. command-line overrides in dotlist form: ``optim.lr=1e-3 model.text.layers=4``.

Every dataclass validates itself in ``__post_init__`` so that a bad value fails before any
process group starts, with a message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
INIT_SCHEMES = ("fan_in", "fixed")
"""Values of ``model.init`` (see megamm/model/init.py)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


ATTENTION_KINDS = ("full", "local", "block_sparse", "linear")
"""Values of ``model.<tower>.attention.kind`` (megamm/model/attention)."""
FEATURE_MAPS = ("elu", "random")


@dataclass
class AttentionConfig:
    """The self-attention kernel of a tower's blocks: one for every layer, or one per layer."""

    kind: str = "full"
    """``full`` (scaled dot product, O(T^2) time), ``local`` (a sliding window plus global tokens),
    ``block_sparse`` (own, neighbouring and global blocks) or ``linear`` (kernelised, O(T))."""
    layers: str = ""
    """One kind per layer, comma-separated (``local,local,full``); empty: ``kind`` for every layer."""
    window: int = 64
    """local: the positions each query sees on each side (only before it when causal)."""
    global_tokens: int = 0
    """local: the first positions, which see and are seen by every position (a class token: 1)."""
    block_size: int = 32
    """block_sparse: positions per block."""
    num_neighbors: int = 1
    """block_sparse: the blocks on each side a block attends to."""
    num_global_blocks: int = 0
    """block_sparse: the first blocks, which see and are seen by every block."""
    feature_map: str = "elu"
    """linear: ``elu`` (elu(x) + 1) or ``random`` (positive random features, seeded)."""
    num_features: int = 0
    """linear with random features: how many (0: the head dimension)."""

    def kinds(self, num_layers: int) -> list[str]:
        """The kernel of each of ``num_layers`` layers."""
        if not self.layers:
            return [self.kind] * num_layers
        return [kind.strip() for kind in self.layers.split(",")]

    def options(self, kind: str) -> dict[str, Any]:
        """The keyword arguments of kernel ``kind`` (``megamm.model.attention.attention_kernel``)."""
        if kind == "local":
            return {"window": self.window, "global_tokens": self.global_tokens}
        if kind == "block_sparse":
            return {
                "block_size": self.block_size,
                "num_neighbors": self.num_neighbors,
                "num_global_blocks": self.num_global_blocks,
            }
        if kind == "linear":
            return {"feature_map": self.feature_map, **({"num_features": self.num_features} if self.num_features else {})}
        return {}

    def validate(self, prefix: str, num_layers: int) -> None:
        kinds = self.kinds(num_layers)
        _require(
            len(kinds) == num_layers,
            f"{prefix}.layers={self.layers!r} names {len(kinds)} kernels for {num_layers} layers; give one per "
            "layer, or leave it empty to use attention.kind for all",
        )
        for kind in kinds:
            _require(kind in ATTENTION_KINDS, f"{prefix}: attention kind {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")
        _require(self.window >= 0, f"{prefix}.window must be >= 0, got {self.window}")
        _require(self.global_tokens >= 0, f"{prefix}.global_tokens must be >= 0, got {self.global_tokens}")
        _require(self.block_size >= 1, f"{prefix}.block_size must be >= 1, got {self.block_size}")
        _require(
            self.num_neighbors >= 0 and self.num_global_blocks >= 0,
            f"{prefix}.num_neighbors and {prefix}.num_global_blocks must be >= 0",
        )
        _require(
            self.feature_map in FEATURE_MAPS,
            f"{prefix}.feature_map={self.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}",
        )
        _require(self.num_features >= 0, f"{prefix}.num_features must be >= 0 (0: the head dimension)")


@dataclass
class TransformerConfig:
    """Shape of one transformer encoder tower."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    """MLP hidden width = mlp_ratio * hidden_size."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Which attention kernel the tower's blocks run."""

    def validate(self, prefix: str) -> None:
        _require(self.hidden_size > 0, f"{prefix}.hidden_size must be positive, got {self.hidden_size}")
        _require(self.num_layers > 0, f"{prefix}.num_layers must be positive, got {self.num_layers}")
        _require(self.num_heads > 0, f"{prefix}.num_heads must be positive, got {self.num_heads}")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
            f"{prefix}.num_heads={self.num_heads}; choose a hidden size that is a multiple of the head count",
        )
        _require(self.mlp_ratio > 0, f"{prefix}.mlp_ratio must be positive, got {self.mlp_ratio}")
        self.attention.validate(f"{prefix}.attention", self.num_layers)

    @property
    def ffn_size(self) -> int:
        return int(round(self.hidden_size * self.mlp_ratio))


@dataclass
class TextConfig(TransformerConfig):
    """Text encoder: SentencePiece ids -> token features."""

    vocab_size: int = 256
    """Must be >= the tokenizer's vocabulary size."""
    max_length: int = 32
    """Captions are truncated or padded to this many tokens (BOS and EOS included)."""
    causal: bool = False
    """Each token attends to itself and the tokens before it only (a decoder's attention); the
    pooled caption is still the mean over its tokens."""
    positions: str = "learned"
    """``learned`` (a position embedding added to the tokens) or ``rotary`` (queries and keys
    rotated by position in every attention layer; no position embedding)."""
    pad_id: int = 0
    """The tokenizer's padding, begin- and end-of-sequence ids (megamm's SentencePiece models: 0, 2, 3);
    generation starts at bos_id and stops at eos_id."""
    bos_id: int = 2
    eos_id: int = 3

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            _require(0 <= value < self.vocab_size, f"{prefix}.{name}={value} is not a token id below vocab_size={self.vocab_size}")
        _require(
            self.positions in ("learned", "rotary"),
            f"{prefix}.positions={self.positions!r} is not one of learned, rotary",
        )
        _require(self.vocab_size > 0, f"{prefix}.vocab_size must be positive, got {self.vocab_size}")
        _require(self.max_length >= 3, f"{prefix}.max_length must be >= 3 (BOS, a token, EOS)")


@dataclass
class ImageConfig(TransformerConfig):
    """Image encoder: a ViT over non-overlapping square patches."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _require(
            self.image_size % self.patch_size == 0,
            f"{prefix}.image_size={self.image_size} is not divisible by {prefix}.patch_size="
            f"{self.patch_size}; pick a patch size that divides the image size",
        )


@dataclass
class AudioConfig(TransformerConfig):
    """Audio encoder: 16 kHz mono waveform -> log-mel spectrogram -> patches over time x frequency
    (AST-style) -> transformer, pooled at its class token."""

    enabled: bool = False
    """Build the audio encoder (and read the samples' ``wav``)."""
    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 400
    """STFT window (25 ms at 16 kHz)."""
    hop_length: int = 160
    """STFT hop (10 ms at 16 kHz): one spectrogram frame per hop."""
    patch_time: int = 8
    """Frames per patch."""
    patch_frequency: int = 16
    """Mel bins per patch; must divide n_mels."""
    max_seconds: float = 1.0
    """The longest audio the position embeddings cover."""
    mean: float = 0.0
    """The log-mel values are normalised as (x - mean) / std."""
    std: float = 1.0

    @property
    def max_frames(self) -> int:
        """Spectrogram frames of ``max_seconds`` of audio (the position table's length in time)."""
        return int(round(self.max_seconds * self.sample_rate)) // self.hop_length + 1

    @property
    def max_samples(self) -> int:
        """The longest waveform (padding included) the encoder takes."""
        return self.max_frames * self.hop_length - 1

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _require(self.sample_rate > 0, f"{prefix}.sample_rate must be positive, got {self.sample_rate}")
        _require(self.n_fft >= 2 and self.hop_length >= 1, f"{prefix}.n_fft must be >= 2 and {prefix}.hop_length >= 1")
        _require(
            self.patch_frequency >= 1 and self.n_mels % self.patch_frequency == 0,
            f"{prefix}.n_mels={self.n_mels} is not divisible by {prefix}.patch_frequency={self.patch_frequency}; "
            "pick a patch height that divides the mel bins",
        )
        _require(self.patch_time >= 1, f"{prefix}.patch_time must be >= 1, got {self.patch_time}")
        _require(self.max_seconds > 0, f"{prefix}.max_seconds must be positive, got {self.max_seconds}")
        _require(self.std > 0, f"{prefix}.std must be positive, got {self.std}")


FUSION_KINDS = ("gated", "bottleneck", "concat", "weighted")
"""Values of ``model.fusion.kind`` (megamm/model/fusion)."""


@dataclass
class StackConfig:
    """Depth, heads and MLP ratio of a stack of blocks that runs at the text tower's width."""

    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def validate(self, prefix: str, hidden_size: int) -> None:
        _require(self.num_layers >= 1, f"{prefix}.num_layers must be >= 1, got {self.num_layers}")
        _require(
            self.num_heads >= 1 and hidden_size % self.num_heads == 0,
            f"{prefix}.num_heads={self.num_heads} does not divide model.text.hidden_size={hidden_size} (this "
            "stack runs at the text width); pick a head count that divides it",
        )
        _require(self.mlp_ratio > 0, f"{prefix}.mlp_ratio must be positive, got {self.mlp_ratio}")

    def ffn_size(self, hidden_size: int) -> int:
        """MLP hidden width at ``hidden_size``."""
        return int(round(hidden_size * self.mlp_ratio))


@dataclass
class FusionConfig(StackConfig):
    """How the text stream meets the other modalities, for image-text matching and VQA.

    ``gated``: transformer blocks over the text tokens with a tanh-gated cross-attention block
    (Flamingo) to the image and audio tokens after every ``every``-th one; ``bottleneck``:
    ``num_layers`` layers of attention bottlenecks (``bottleneck_tokens`` shared tokens) over the
    text, image and audio streams; ``concat``: concatenated pooled representations + MLP (the
    baseline for ablations); ``weighted``: a softmax-weighted sum of the pooled representations,
    with its own weights per task (``itm``, ``vqa``). Runs at the text tower's width.
    """

    kind: str = "gated"
    """gated, bottleneck, concat or weighted (``num_layers``: gated's blocks, bottleneck's layers)."""
    every: int = 1
    """gated: a gated cross-attention block after every this many blocks."""
    bottleneck_tokens: int = 4

    def validate(self, prefix: str, hidden_size: int) -> None:
        _require(self.kind in FUSION_KINDS, f"{prefix}.kind={self.kind!r} is not one of {', '.join(FUSION_KINDS)}")
        super().validate(prefix, hidden_size)
        _require(
            1 <= self.every <= self.num_layers,
            f"{prefix}.every={self.every} must be in [1, {prefix}.num_layers={self.num_layers}] (a gated block "
            "after every this many blocks)",
        )
        _require(self.bottleneck_tokens >= 1, f"{prefix}.bottleneck_tokens must be >= 1")


@dataclass
class DecoderConfig(StackConfig):
    """The causal text decoder of captioning and generated answers: it cross-attends to the
    image and audio tokens (captions) or to the fused question (answers). Text-tower width."""

    positions: str = "learned"
    """``learned`` or ``rotary``."""
    label_smoothing: float = 0.0

    def validate(self, prefix: str, hidden_size: int) -> None:
        super().validate(prefix, hidden_size)
        _require(self.positions in ("learned", "rotary"), f"{prefix}.positions={self.positions!r} is not one of learned, rotary")
        _require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing must be in [0, 1)")


CONTRASTIVE_PAIRS = ("image_text", "audio_text", "image_audio")
"""The contrastive objectives, one per modality pair."""


@dataclass
class ObjectivesConfig:
    """The training loss: a weighted sum of these objectives (0: the objective and the modules only
    it needs are left out)."""

    image_text: float = 1.0
    """Contrastive image-text (InfoNCE, negatives from the whole data-parallel group)."""
    audio_text: float = 0.0
    """Contrastive audio-text; needs model.audio.enabled."""
    image_audio: float = 0.0
    """Contrastive image-audio; needs model.audio.enabled."""
    captioning: float = 0.0
    """Next-token loss of the caption decoder, given the image and audio tokens."""
    itm: float = 0.0
    """Image-text matching with hard negatives mined from the image-text similarities."""
    vqa: float = 0.0
    """Answer classification over the answer vocabulary, from the fused question and image."""
    vqa_generative: float = 0.0
    """The decoder's next-token loss on the answer, given the fused question and image."""
    num_answers: int = 20
    """Size of the answer vocabulary (the demo's: 20)."""

    def weights(self) -> dict[str, float]:
        """Every objective's weight, by name."""
        return {name: getattr(self, name) for name in (*CONTRASTIVE_PAIRS, "captioning", "itm", "vqa", "vqa_generative")}

    def validate(self, prefix: str) -> None:
        for name, weight in self.weights().items():
            _require(weight >= 0, f"{prefix}.{name}={weight} must be >= 0 (0 turns the objective off)")
        _require(any(w > 0 for w in self.weights().values()), f"every {prefix} weight is 0: turn at least one on")
        _require(self.num_answers >= 2, f"{prefix}.num_answers must be >= 2, got {self.num_answers}")


@dataclass
class ModelConfig:
    """The multi-modal model: encoders, shared embedding space, initialisation."""

    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Used when model.objectives.itm, vqa or vqa_generative is on."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Used when model.objectives.captioning or vqa_generative is on."""
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    embed_dim: int = 64
    """Width of the shared (contrastive) embedding space."""
    init: str = "fan_in"
    """Weight initialisation scheme: fan_in (std 1/sqrt(fan_in), residual outputs also scaled by
    1/sqrt(2 * layers)) or fixed (std init_std everywhere, GPT-2/Megatron style, suited to
    widths in the thousands only). See megamm/model/init.py."""
    init_std: float = 0.02
    """Std of position embeddings; of every matrix under init=fixed."""
    token_embedding_std: float = 1.0
    """Std of the token embedding (nn.Embedding's default); the skeleton used 0.02."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log temperature of the contrastive loss (CLIP uses log(1/0.07))."""
    logit_scale_max: float = math.log(100.0)
    dropout: float = 0.0
    """Dropout probability of the hidden states: on the embeddings' output and on the attention and
    MLP outputs before they join the residual stream (0: off). Drawn from the random stream that
    every tensor-parallel rank shares, or from each rank's own under sequence parallelism, where
    the ranks hold different slices of the sequence (megamm.parallel.random)."""
    attention_dropout: float = 0.0
    """Dropout probability of the attention probabilities (0: off), drawn from each tensor-parallel
    rank's own random stream, since each rank holds its own heads."""

    @property
    def num_pipeline_layers(self) -> int:
        """Layers of the pipeline form (megamm/model/pipeline.py): the embeddings (image, text,
        audio), each tower's blocks and head, a context projection per context modality (with a
        fusion or decoder), a temperature per contrastive head, the fusion (its input layer, then
        for ``gated`` each block, each gated cross-attention block and the final norm, for the
        other kinds one layer), the matching and answer heads, and the decoder (token embedding,
        positions, blocks, final norm, tied LM head). The dual encoder: 2 + Li + 1 + Lt + 1 + 1."""
        towers = [self.image, self.text] + ([self.audio] if self.audio.enabled else [])
        layers = len(towers) + sum(tower.num_layers + 1 for tower in towers)
        objectives = self.objectives
        pairs = [pair for pair in CONTRASTIVE_PAIRS if getattr(objectives, pair) > 0]
        layers += len(pairs)  # temperatures
        layers += 1 if objectives.itm > 0 and "image_text" not in pairs else 0  # the temperature of mining
        if self.uses_fusion or self.uses_decoder:
            layers += len(self.modalities) - 1  # context projections
        if self.uses_fusion:
            fusion = self.fusion
            if fusion.kind == "gated":
                layers += 1 + fusion.num_layers + fusion.num_layers // fusion.every + 1
            else:
                layers += 1 + 1
            layers += (objectives.itm > 0) + (objectives.vqa > 0)
        if self.uses_decoder:
            layers += 2 + self.decoder.num_layers + 2
        return layers

    @property
    def data_extras(self) -> tuple[str, ...]:
        """What the model reads from a sample beside its image and caption (``megamm.data.EXTRAS``:
        ``"audio"``, ``"qa"``); the loaders neither screen nor decode the rest."""
        extras = ("audio",) if self.audio.enabled else ()
        return extras + (("qa",) if self.uses_questions else ())

    @property
    def data_pairs(self) -> tuple[str, ...]:
        """The modality pairs that make a training sample usable (``megamm.data.PAIRS``): image+text
        always, audio+text and image+audio when their contrastive objectives are on."""
        pairs = ["image_text"]
        if self.audio.enabled and self.objectives.audio_text > 0:
            pairs.append("audio_text")
        if self.audio.enabled and self.objectives.image_audio > 0:
            pairs.append("image_audio")
        return tuple(pairs)

    @property
    def uses_questions(self) -> bool:
        """True when an objective reads question-answer pairs (VQA)."""
        return self.objectives.vqa > 0 or self.objectives.vqa_generative > 0

    @property
    def uses_fusion(self) -> bool:
        """True when an objective runs the fusion layers (image-text matching, VQA)."""
        return self.objectives.itm > 0 or self.uses_questions

    @property
    def uses_decoder(self) -> bool:
        """True when an objective runs the text decoder (captioning, generated answers)."""
        return self.objectives.captioning > 0 or self.objectives.vqa_generative > 0

    @property
    def is_dual_encoder(self) -> bool:
        """True for the CLIP-style image-text dual encoder: no audio, fusion or decoder."""
        weights = self.objectives.weights()
        return not self.audio.enabled and all(w == 0 for name, w in weights.items() if name != "image_text")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The encoders the model has, in order."""
        return ("text", "image", "audio") if self.audio.enabled else ("text", "image")

    def validate(self, prefix: str = "model") -> None:
        self.text.validate(f"{prefix}.text")
        self.image.validate(f"{prefix}.image")
        if self.audio.enabled:
            self.audio.validate(f"{prefix}.audio")
        self.objectives.validate(f"{prefix}.objectives")
        for pair in ("audio_text", "image_audio"):
            _require(
                getattr(self.objectives, pair) == 0 or self.audio.enabled,
                f"{prefix}.objectives.{pair} needs the audio encoder: set {prefix}.audio.enabled=true, or "
                f"{prefix}.objectives.{pair}=0",
            )
        if self.uses_fusion:
            self.fusion.validate(f"{prefix}.fusion", self.text.hidden_size)
        if self.uses_decoder:
            self.decoder.validate(f"{prefix}.decoder", self.text.hidden_size)
        _require(self.embed_dim > 0, f"{prefix}.embed_dim must be positive, got {self.embed_dim}")
        _require(
            self.init in INIT_SCHEMES,
            f"{prefix}.init={self.init!r} is not one of {', '.join(INIT_SCHEMES)}",
        )
        _require(self.init_std > 0, f"{prefix}.init_std must be positive, got {self.init_std}")
        _require(
            self.token_embedding_std > 0,
            f"{prefix}.token_embedding_std must be positive, got {self.token_embedding_std}",
        )
        for name in ("dropout", "attention_dropout"):
            p = getattr(self, name)
            _require(
                0.0 <= p < 1.0,
                f"{prefix}.{name}={p} is not a probability in [0, 1); use 0 to turn it off, e.g. {prefix}.{name}=0.1",
            )


def pipeline_split(partition: str, num_layers: int, stages: int) -> Optional[list[int]]:
    """Stage boundaries ``[0, ..., num_layers]`` of a user-given split; None for DeepSpeed's methods.

    ``partition`` is ``parameters``, ``uniform``, ``type:<regex>`` (DeepSpeed partitions), or the
    number of layers of each stage, such as ``3,7``.

    Raises:
        ConfigError: naming ``parallel.pipeline_partition`` and the fix.
    """
    if partition in ("parameters", "uniform") or (partition.startswith("type:") and len(partition) > 5):
        return None
    _require(
        re.fullmatch(r"\d+(,\d+)*", partition) is not None,
        f"parallel.pipeline_partition={partition!r} is not parameters, uniform, type:<regex> or a "
        "comma-separated count of layers per stage such as 3,7",
    )
    counts = [int(part) for part in partition.split(",")]
    _require(
        len(counts) == stages and sum(counts) == num_layers and min(counts) >= 1,
        f"parallel.pipeline_partition={partition} must give {stages} positive layer counts (one per stage) "
        f"summing to the model's {num_layers} pipeline layers",
    )
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return bounds


@dataclass
class ParallelConfig:
    """How the world is split. The data-parallel size is what remains: world / (tp * pp)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    """Pipeline stages. Above 1, DeepSpeed's pipeline engine runs (ZeRO stage 0 or 1 only), with
    grad_accum_steps micro-batches in flight per step."""
    pipeline_partition: str = "parameters"
    """How layers are cut into stages: parameters (balance parameter counts), uniform (balance
    layer counts), type:<regex> (balance layers whose class name matches) or the number of layers
    of each stage, such as 4,6 (see megamm/model/pipeline.py for the layer sequence)."""
    zero_stage: int = 3
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (less activation memory, one more
    forward pass); the numbers do not change."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: outside the tensor-parallel regions (LayerNorms, dropout,
    residuals) each tensor-parallel rank holds a slice of the sequence, so their activations take
    1/tensor_parallel of the memory; an all-gather enters each column-parallel layer and a
    reduce-scatter leaves each row-parallel one, in place of tensor parallelism's all-reduces. A
    stream whose length is not a multiple of tensor_parallel is padded with positions that attention
    ignores and pooling drops. Without dropout it computes what tensor parallelism alone computes.
    A no-op at tensor_parallel=1."""
    collective_timeout_s: float = 1800.0
    """How long a rank may wait without progress (a step, an evaluation round, a save) before it
    fails the job; also the process group's collective timeout. A rank that dies ends the job at
    once (its connections close); one that hangs (a stopped process, a stalled filesystem) ends
    it after this long. Keep it above the slowest step, save or evaluation round."""

    def validate(self, prefix: str = "parallel") -> None:
        _require(self.tensor_parallel >= 1, f"{prefix}.tensor_parallel must be >= 1")
        _require(
            self.collective_timeout_s >= 1,
            f"{prefix}.collective_timeout_s must be >= 1 second, got {self.collective_timeout_s}",
        )
        _require(self.pipeline_parallel >= 1, f"{prefix}.pipeline_parallel must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage must be 0, 1, 2 or 3")
        _require(
            self.pipeline_parallel == 1 or self.zero_stage <= 1,
            f"{prefix}.zero_stage={self.zero_stage} with {prefix}.pipeline_parallel={self.pipeline_parallel}: "
            "DeepSpeed's pipeline engine runs ZeRO stages 0 and 1 only (stages 2 and 3 partition gradients "
            f"and parameters, which its schedule does not support); set {prefix}.zero_stage=1",
        )

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` ranks; raises if it does not divide."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        _require(
            world_size % model_parallel == 0,
            f"world size {world_size} is not divisible by parallel.tensor_parallel="
            f"{self.tensor_parallel} x parallel.pipeline_parallel={self.pipeline_parallel}; "
            "launch a multiple of tp*pp ranks or change the parallel sizes",
        )
        return world_size // model_parallel


SAMPLING_MODES = ("epochs", "resample")


def _require_specification(value: Any, name: str) -> None:
    """A shard specification: a non-empty string, or a non-empty list of them."""
    items = value if isinstance(value, list) else [value]
    _require(
        bool(items) and all(isinstance(item, str) and item.strip() for item in items),
        f"{name}={value!r} must be a shard specification (path, pattern or pipe: command) or a list of them",
    )


@dataclass
class SourceConfig:
    """One dataset of a training mixture (``data.sources``)."""

    shards: str | list[str] = ""
    """Its shards: as ``data.train_shards`` (paths, patterns, ``pipe:`` commands, or a list)."""
    weight: float = 1.0
    """Relative share of the training samples drawn from it."""
    index: str = ""
    """A sizes.json giving each shard's sample count by file name ("" : the sizes.json beside
    local shards). ``pipe:`` shards need one for epochs to be split by sample."""
    name: str = ""
    """Shown in logs ("" : source<i>)."""

    def validate(self, prefix: str) -> None:
        _require_specification(self.shards, f"{prefix}.shards")
        _require(self.weight > 0, f"{prefix}.weight must be positive, got {self.weight}")


@dataclass
class DataConfig:
    """Where samples come from and how they are read. Knows nothing about the model."""

    train_shards: str | list[str] = "demo_data/train/shard-{000000..000007}.tar"
    """Brace pattern, glob, directory, ``pipe:`` command, or a list (YAML, or comma-separated) of
    these (read when ``data.sources`` is empty)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several datasets mixed in one stream by weight; replaces ``train_shards`` when given."""
    sampling: str = "epochs"
    """``epochs``: each source's samples once per epoch, in a shuffled order seeded by seed and
    epoch; ``resample``: shards drawn with replacement, seeded per epoch and stream."""
    open_shards: int = 4
    """Shards each stream reads at once per source, interleaving their samples."""
    max_bad_fraction: float = 0.1
    """Stop training once more than this fraction of the samples read was bad (from
    ``bad_data_min_samples`` samples on)."""
    bad_data_min_samples: int = 1000
    """Samples read before the bad fraction is judged."""
    check_keys_every: int = 0
    """Every this many steps, check that the tensor- and pipeline-parallel peers of each
    data-parallel rank read the same samples (a digest of the keys; 0: never)."""
    eval_shards: str | list[str] = "demo_data/eval/shard-{000000..000000}.tar"
    tokenizer: str = "demo_data/tokenizer.model"
    """Path of a SentencePiece model (train one with tools/train_tokenizer.py)."""
    image_size: int = 32
    max_text_length: int = 32
    max_audio_seconds: float = 1.0
    """Audio is cut to this many seconds (with an audio encoder: model.audio.max_seconds)."""
    num_workers: int = 1
    """DataLoader worker processes per rank; shards are split over dp ranks x workers."""
    shuffle_buffer: int = 256
    """Samples held for in-stream shuffling (0 disables shuffling)."""
    global_batches: bool = False
    """Every data-parallel rank reads all the streams a single rank would read and keeps its rows of
    each global micro-batch (micro_batch_size x data-parallel size), so the training batches are the
    same at any data-parallel size: for layout parity checks and for resuming at another
    data-parallel size with the exact data position. Costs data-parallel-size times the decoding."""
    seed: int = 1234

    def validate(self, prefix: str = "data") -> None:
        for name in ("eval_shards",) if self.sources else ("train_shards", "eval_shards"):
            _require_specification(getattr(self, name), f"{prefix}.{name}")
        _require(bool(self.tokenizer.strip()), f"{prefix}.tokenizer is empty; give a path")
        for index, source in enumerate(self.sources):
            source.validate(f"{prefix}.sources[{index}]")
        _require(
            self.sampling in SAMPLING_MODES,
            f"{prefix}.sampling={self.sampling!r} is not one of {', '.join(SAMPLING_MODES)}",
        )
        _require(self.open_shards >= 1, f"{prefix}.open_shards must be >= 1")
        _require(0 <= self.max_bad_fraction <= 1, f"{prefix}.max_bad_fraction must be in [0, 1]")
        _require(self.bad_data_min_samples >= 1, f"{prefix}.bad_data_min_samples must be >= 1")
        _require(self.check_keys_every >= 0, f"{prefix}.check_keys_every must be >= 0 (0: never)")
        _require(self.num_workers >= 0, f"{prefix}.num_workers must be >= 0")
        _require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer must be >= 0")
        _require(self.image_size > 0, f"{prefix}.image_size must be positive")
        _require(self.max_text_length >= 3, f"{prefix}.max_text_length must be >= 3")
        tenths = self.max_audio_seconds * 10
        _require(
            self.max_audio_seconds > 0 and abs(tenths - round(tenths)) < 1e-9,
            f"{prefix}.max_audio_seconds={self.max_audio_seconds} must be a positive multiple of 0.1 s (batches pad "
            "audio in steps of 0.1 s), e.g. 1.0 or 10.0",
        )


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0

    def validate(self, prefix: str = "optim") -> None:
        _require(self.lr > 0, f"{prefix}.lr must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps must be >= 0")
        _require(len(self.betas) == 2, f"{prefix}.betas must have two values")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip must be >= 0 (0 disables clipping)")


@dataclass
class CheckpointConfig:
    dir: str = "runs/demo/checkpoints"
    save_interval: int = 100
    """Save every this many optimizer steps (and at the end of training)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a newer one is complete."""

    def validate(self, prefix: str = "checkpoint") -> None:
        _require(
            bool(self.dir.strip()),
            f"{prefix}.dir is empty; name a directory, e.g. {prefix}.dir=runs/NAME/checkpoints",
        )
        _require(self.save_interval > 0, f"{prefix}.save_interval must be positive")
        _require(self.keep_last >= 1, f"{prefix}.keep_last must be >= 1")


@dataclass
class LoggingConfig:
    tensorboard_dir: str = "runs/demo/tensorboard"
    log_interval: int = 10
    """Write scalars every this many steps."""
    peak_tflops: float = 0.0
    """One device's peak TFLOP/s in the training precision, to report MFU (0: MFU not reported;
    tools/bench_train.py measures a CPU's matmul peak)."""

    def validate(self, prefix: str = "logging") -> None:
        _require(
            bool(self.tensorboard_dir.strip()),
            f"{prefix}.tensorboard_dir is empty; name a directory, e.g. {prefix}.tensorboard_dir=runs/NAME/tensorboard",
        )
        _require(self.log_interval > 0, f"{prefix}.log_interval must be positive")
        _require(self.peak_tflops >= 0, f"{prefix}.peak_tflops must be >= 0 (0: no MFU), got {self.peak_tflops}")


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    micro_batch_size: int = 32
    """Samples per data-parallel rank per micro step."""
    grad_accum_steps: int = 1
    train_steps: int = 300
    eval_interval: int = 0
    """Evaluate retrieval every this many steps (0: only at the end)."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16"""
    seed: int = 42

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.model.validate("model")
        self.parallel.validate("parallel")
        self.data.validate("data")
        self.optim.validate("optim")
        self.checkpoint.validate("checkpoint")
        self.logging.validate("logging")
        tp = self.parallel.tensor_parallel
        model = self.model
        split: list[tuple[str, int, int]] = [  # (section, heads, MLP width) of every tensor-parallel stack
            (f"model.{tower}", getattr(model, tower).num_heads, getattr(model, tower).ffn_size)
            for tower in model.modalities
        ]
        if model.uses_fusion:
            split.append(("model.fusion", model.fusion.num_heads, model.fusion.ffn_size(model.text.hidden_size)))
        if model.uses_decoder:
            split.append(("model.decoder", model.decoder.num_heads, model.decoder.ffn_size(model.text.hidden_size)))
        for section, heads, ffn in split:
            _require(
                heads % tp == 0,
                f"{section}.num_heads={heads} is not divisible by parallel.tensor_parallel="
                f"{tp}; use a head count that is a multiple of the tensor-parallel size",
            )
            _require(
                ffn % tp == 0,
                f"{section}: the MLP width {ffn} (hidden size x mlp_ratio) is not divisible by "
                f"parallel.tensor_parallel={tp}; adjust {section}.mlp_ratio or the hidden size",
            )
        _require(
            self.model.text.vocab_size % tp == 0,
            f"model.text.vocab_size={self.model.text.vocab_size} is not divisible by "
            f"parallel.tensor_parallel={tp}; round the vocabulary size up to a multiple of it",
        )
        _require(
            self.data.image_size == self.model.image.image_size,
            f"data.image_size={self.data.image_size} differs from model.image.image_size="
            f"{self.model.image.image_size}; set both to the same value",
        )
        _require(
            self.data.max_text_length == self.model.text.max_length,
            f"data.max_text_length={self.data.max_text_length} differs from model.text.max_length="
            f"{self.model.text.max_length}; set both to the same value",
        )
        _require(
            not self.model.audio.enabled or self.data.max_audio_seconds == self.model.audio.max_seconds,
            f"data.max_audio_seconds={self.data.max_audio_seconds} differs from model.audio.max_seconds="
            f"{self.model.audio.max_seconds}; set both to the same value",
        )
        pp, layers = self.parallel.pipeline_parallel, self.model.num_pipeline_layers
        _require(
            pp <= layers,
            f"parallel.pipeline_parallel={pp} stages but the model has {layers} pipeline layers (embeddings, "
            "tower blocks and heads, temperatures, and any context projections, fusion, heads and decoder layers: "
            "ModelConfig.num_pipeline_layers); use fewer stages or more layers",
        )
        if pp > 1:
            pipeline_split(self.parallel.pipeline_partition, layers, pp)
        _require(self.micro_batch_size > 0, "micro_batch_size must be positive")
        _require(self.grad_accum_steps > 0, "grad_accum_steps must be positive")
        _require(self.train_steps > 0, "train_steps must be positive")
        _require(self.eval_interval >= 0, "eval_interval must be >= 0")
        _require(
            self.precision in ("fp32", "bf16", "fp16"),
            f"precision={self.precision!r} is not one of fp32, bf16, fp16",
        )


# ----------------------------------------------------------------------------------------------
# Loading: defaults -> YAML -> dotlist overrides


T = TypeVar("T")


def _coerce(value: Any, target_type: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type of a field."""
    origin = getattr(target_type, "__origin__", None)
    if target_type is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return bool(value)
    if target_type in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name}: expected {target_type.__name__}, got {value!r}")
    if target_type is float and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected float, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return number
    if target_type in (int, float, str):
        try:
            if target_type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return target_type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {target_type.__name__}, got {value!r}") from None
    if origin is list and target_type.__args__ and is_dataclass(target_type.__args__[0]):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f"{name}: expected a list of mappings, e.g. [{{shards: a.tar, weight: 1}}], got {value!r}")
        item_type = target_type.__args__[0]
        return [_from_dict(item_type, item, f"{name}[{index}].") for index, item in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list like [a, b], got {value!r}")
        item_types = target_type.__args__
        if len(item_types) != len(value):
            raise ConfigError(f"{name}: expected {len(item_types)} values, got {len(value)}")
        return tuple(_coerce(v, t, name) for v, t in zip(value, item_types))
    return value


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config field {name!r}; known fields: {', '.join(sorted(known))}")
        field_type = hints[key]
        if is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping, got {value!r}")
            kwargs[key] = _from_dict(field_type, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, field_type, name)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_value(raw: str, item: str) -> Any:
    """An override's value, parsed as YAML (``3`` -> 3, ``[a, b]`` -> a list, ``""`` -> "")."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value does not parse ({problem}); quote it for the shell, "
            "e.g. key='[a, b]' or key='text: with colon'"
        ) from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        if key in seen:
            hint = ""
            if ".tar" in seen[key] and ".tar" in item:
                hint = (
                    f". An unquoted brace pattern is expanded by the shell into one argument per "
                    f"shard: quote it, e.g. {key}='dir/shard-{{000000..000007}}.tar'"
                )
            raise ConfigError(f"{key} is given twice ({seen[key]!r} and {item!r}); give it once{hint}")
        seen[key] = item
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = _parse_value(raw, item)
    return tree


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name (``tiny``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no recipe named {name_or_path!r}; available: {', '.join(available)}")
    return named


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML recipe (if given), then ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if name_or_path:
        path = resolve_recipe(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or "invalid YAML"
            raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}; fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    data = _deep_merge(data, parse_overrides(overrides))
    return _from_dict(TrainConfig, data, "")


def config_from_dict(base: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """A config from a saved nested dict (a checkpoint's), then ``key.sub=value`` overrides."""
    return _from_dict(TrainConfig, _deep_merge(base, parse_overrides(overrides)), "")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists), suitable for YAML or JSON."""
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))
