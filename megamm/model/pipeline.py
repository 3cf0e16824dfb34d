"""The multi-modal model as a sequence of pipeline layers (DeepSpeed ``LayerSpec``s).

The model becomes one flat sequence of layers, cut into stages by DeepSpeed's ``PipelineModule``.
Between layers travels a *stream*: a tuple of tensors, each a named field (``"image"``,
``"text_keys"``, ``"image_emb"``, ...). Every layer declares the fields it reads and writes;
:func:`layer_specs` derives from that, for the config at hand, which fields are alive after each
layer and hands every layer its :class:`StreamFields` (the names of the tuple it receives and of
the one it returns). A field leaves the stream after its last reader, fields keep the order in
which they first appear, and the first layer receives :func:`pipeline_inputs` (what the runner
sends). Each layer unpacks its tuple into a dict by name, computes, and packs the fields that
stay alive.

The image-text dual encoder (``model.is_dual_encoder``):

    0  ImageEmbeddingLayer      (image, text_ids, text_mask)   -> (image (B, N+1, Hi), text_ids, text_mask)
    1  TextEmbeddingLayer       ...                            -> (image, text (B, T, Ht), text_keys (B, T))
       BlockLayer("image") x Li                                -> (block(image), text, text_keys)
       HeadLayer("image")                                      -> (image_emb (B, E), text, text_keys)
       BlockLayer("text") x Lt                                 -> (image_emb, block(text), text_keys)
       HeadLayer("text")                                       -> (image_emb, text_emb (B, E))
       TemperatureLayer                                        -> (image_emb, text_emb, contrastive_scale (1,))

and :class:`ContrastiveLoss` turns the last stage's output into the loss.

The whole model (:class:`~megamm.model.MultiModalTransformer` with audio, fusion, decoder and
every objective) continues the same way, each part present only where the plain model has it:

- embeddings: ``ImageEmbeddingLayer``, ``TextEmbeddingLayer`` (the captions and, when an objective
  reads questions, the questions stacked below them: the text tower runs once over 2B rows, so
  the question's second pass needs no second tower), ``AudioEmbeddingLayer`` (log-mel + patches);
- per tower (image, text, audio) its ``BlockLayer`` s and ``HeadLayer`` (final norm, pooling,
  projection; and the token features the fusion and the decoder read);
- a ``ContextLayer`` per context modality (image, audio tokens at the text width, masked where
  a row lacks the modality), a ``TemperatureLayer`` per contrastive head;
- the fusion: ``FusionInputLayer`` (mines the image-text matching's hard negatives with the
  batch's generator, and stacks the 3B matching rows and the B question rows), then for
  ``fusion.kind=gated`` a ``FusionBlockLayer`` per block, a ``GatedLayer`` after every
  ``every``-th one and a ``FusionNormLayer``, for the other kinds one ``FusionLayer``;
  ``ITMHeadLayer`` and ``VQAHeadLayer`` turn the fused rows into their losses;
- the decoder: its token embedding (``DecoderTokenEmbedding``, a ``TiedLayerSpec`` shared with the
  LM head, see below), ``DecoderPositionLayer``, a ``DecoderBlockLayer`` per block (captions
  attend to the image and audio tokens, answers to the fused question, both streams in the same
  layer), ``DecoderNormLayer``, and the tied LM head, which computes the caption and answer
  losses (vocabulary-parallel cross entropy) so that no (B, T, V) logits travel.

:class:`MultiModalLoss` adds the contrastive losses (every pair, missing modalities masked as in
the plain model) to the losses the layers computed, with the objectives' weights, in the plain
model's order: the same total. Float fields are sent with gradients between stages, so every
one of them must reach the loss through autograd; the loss also touches (times zero) the fields
it reads only for evaluation (the embeddings of a modality in no contrastive pair, a temperature
read only for mining negatives). Integer and boolean fields carry no gradient.

The decoder's token embedding is tied to its LM head: a ``TiedLayerSpec`` (key
``decoder_embedding``) used twice, as the embedding (its module's ``forward``) and as the head
(``forward_fn``). DeepSpeed builds it on each stage that uses it and sums the two stages'
gradients of its weight; it holds the table only (the decoder's position embedding is its own
layer, drawn in the same random-stream piece as the plain model draws it).

Each layer draws its weights in the random stream of its piece (``"image.block.3"``,
``"decoder.embedding"``, ...; :meth:`megamm.model.init.WeightInit.seeded`) with the same modules
as :class:`~megamm.model.MultiModalTransformer`, so a pipeline of any shape starts from the very
weights one process builds, and computes the same loss. Hard negatives come from a generator
seeded by the batch's tokens (:func:`megamm.model.objectives.batch_generator`), not from the
global random stream, so they too are the plain model's. In evaluation (``eval()``) no negatives
are mined (an evaluation batch may have one row); the matching rows then pair each image with its
own caption, which nothing reads.

Under sequence parallelism (``sequence_parallel`` at tp > 1) the towers' streams travel as each
tensor-parallel rank's slice of the sequence, padded to a multiple of tp: image (B, T'i / tp, Hi),
text (B, T't / tp, Ht), and the text embedding pads the key mask to (B, T't); every rank sends its
own slices to the same tensor-parallel rank of the next stage. The heads pool from the slices, as
the single-process model does, and gather the whole token sequences the fusion and the decoder
read. DeepSpeed's partitioning of activations between stages (its ``pipeline.pipe_partitioned``,
``grad_partitioned``) must be off: it splits the first tensor over the tensor-parallel ranks and
sends the parts, taking that tensor to be alike on every one of them.

Parameter names differ between the two forms: DeepSpeed names a pipeline layer's parameters
after the layer's index (``"5.block.attn.qkv.weight"``; a ``TiedLayerSpec``'s after its key,
``"tied_modules.<key>.<name>"``), the plain model after its modules
(``"text_encoder.transformer.layers.0.attn.qkv.weight"``). Each layer class says what each of
its own submodules (or parameters) is called in the plain model (``PLAIN_NAMES``, filled in with
the layer's arguments), and :func:`plain_prefixes` lists them for every layer of a config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megamm.config import CONTRASTIVE_PAIRS, ModelConfig, pipeline_split
from megamm.model.blocks import (
    SequenceLayout,
    SequenceParallelLayerNorm,
    TransformerBlock,
    hidden_dropout,
    tower_attention,
)
from megamm.model.decoder import IGNORE_INDEX, DecoderBlock
from megamm.model.encoders.audio import AudioPatchEmbedding
from megamm.model.encoders.image import ImagePatchEmbedding, pool_class_token
from megamm.model.encoders.melspec import LogMelSpectrogram
from megamm.model.encoders.text import TextEmbedding, masked_mean
from megamm.model.fusion.encoder import FusionEncoder
from megamm.model.fusion.gated import GatedCrossAttentionBlock, gated_positions
from megamm.model.heads import CLAMP_ATTRIBUTE, Projection, contrastive_loss
from megamm.model.init import WeightInit
from megamm.model.multimodal import CONTRASTIVE_HEADS, ContextProjection, weight_init
from megamm.model.objectives import NO_ANSWER, ImageTextMatchingHead, VQAClassifier, batch_generator, matching_pairs
from megamm.parallel import ParallelState, checkpoint, copy_to_group, vocab_parallel_cross_entropy
from megamm.parallel.layers import VocabParallelEmbedding
from megamm.parallel.mappings import ProcessGroup

Stream = tuple[torch.Tensor, ...]
Values = dict[str, torch.Tensor]
MODALITIES = ("image", "text")
"""The dual encoder's towers, in pipeline order."""
TOWERS = ("image", "text", "audio")
"""Every tower, in pipeline order (the audio one where the model has it)."""
DECODER_KEY = "decoder_embedding"
"""The ``TiedLayerSpec`` key of the decoder's token embedding (shared with its LM head)."""
LOSS_OBJECTIVES = ("captioning", "itm", "vqa", "vqa_generative")
"""The objectives whose loss a layer computes (field ``loss_<name>``); the contrastive pairs'
are computed by the loss function."""

_INPUT_FIELDS = {
    "": ("image", "text_ids", "text_mask"),
    "audio": ("audio", "audio_lengths", "has_audio", "has_image", "has_text"),
    "qa": ("question_ids", "question_mask", "answer", "answer_ids", "answer_mask"),
}
"""With audio, a row may lack its image or its caption (audio+text, image+audio samples): the
loader's has_image and has_text (B,) say which, where without audio every row has both."""


def pipeline_inputs(config: ModelConfig) -> tuple[str, ...]:
    """The names of the tensors the first stage receives, in order: image (B, C, S, S), text_ids
    (B, T), text_mask (B, T) and, with the data extras the model reads (``config.data_extras``),
    audio (B, S), audio_lengths (B,), has_audio (B,), question_ids / question_mask (B, T), answer
    (B,), answer_ids / answer_mask (B, T); with audio also has_image and has_text (B,)."""
    return tuple(name for extra in ("", *config.data_extras) for name in _INPUT_FIELDS[extra])


@dataclass(frozen=True)
class StreamFields:
    """The names of a layer's input tuple and of its output tuple."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class StreamLayer(nn.Module):
    """A pipeline layer on a named stream: :meth:`compute` reads fields by name and returns the
    fields it writes; :meth:`forward` unpacks the tuple and packs the fields still alive."""

    def __init__(self, fields: StreamFields) -> None:
        super().__init__()
        self.fields = fields

    def compute(self, values: Values) -> Values:
        raise NotImplementedError

    def forward(self, inputs: Stream) -> Stream:
        return _run(self.compute, self.fields, inputs)


def _run(compute: Callable[[Values], Values], fields: StreamFields, inputs: Any) -> Stream:
    values = dict(zip(fields.inputs, (inputs,) if isinstance(inputs, torch.Tensor) else inputs))
    values.update(compute(values))
    return tuple(values[name] for name in fields.outputs)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    """A loss as a (1,) tensor (the stream's tensors are never 0-dim)."""
    return loss.reshape(1)


def _stack_rows(first: torch.Tensor, second: torch.Tensor, pad: Any) -> torch.Tensor:
    """(B1, T1, ...) and (B2, T2, ...) -> (B1 + B2, max T, ...), the shorter padded with ``pad``."""
    length = max(first.shape[1], second.shape[1])
    parts = []
    for part in (first, second):
        if part.shape[1] < length:
            shape = (part.shape[0], length - part.shape[1], *part.shape[2:])
            part = torch.cat([part, part.new_full(shape, pad)], dim=1)
        parts.append(part)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Towers


class ImageEmbeddingLayer(StreamLayer):
    """image (B, C, S, S) -> image features (B, N+1, Hi) (this rank's slice under sequence
    parallelism) and has_image (B,) bool: the input's where the stream carries one (models with
    audio), else all True (every row has an image)."""

    PLAIN_NAMES = {"embedding": "image_encoder.embedding"}

    def __init__(
        self,
        config: ModelConfig,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
        fields: Optional[StreamFields] = None,
    ) -> None:
        super().__init__(fields or _DEFAULT)
        image = config.image
        self.embedding = ImagePatchEmbedding(
            image.image_size, image.patch_size, image.channels, image.hidden_size, init, group, sequence_parallel,
            config.dropout,
        )  # fmt: skip

    def compute(self, values: Values) -> Values:
        images = values["image"]
        has_image = values.get("has_image")
        if has_image is None:
            has_image = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)  # (B,)
        return {"image": self.embedding(images), "has_image": has_image}


class TextEmbeddingLayer(StreamLayer):
    """text_ids / text_mask (B, T) (and with ``questions`` question_ids / question_mask stacked
    below, 2B rows, padded to the longer of the two) -> text features (R, T, Ht) and their key mask
    text_keys (R, T') (padded like the stream under sequence parallelism); has_text (B,) bool: the
    input's where the stream carries one (models with audio), else the rows with any token."""

    PLAIN_NAMES = {"embedding": "text_encoder.embedding"}

    def __init__(
        self,
        config: ModelConfig,
        group: ProcessGroup,
        init: WeightInit,
        sequence_parallel: bool = False,
        questions: bool = False,
        fields: Optional[StreamFields] = None,
    ) -> None:
        super().__init__(fields or _DEFAULT)
        text = config.text
        self.questions = questions
        self.pad_id = text.pad_id
        self.embedding = TextEmbedding(
            text.vocab_size, text.max_length, text.hidden_size, group, init, sequence_parallel, config.dropout,
            learned_positions=text.positions == "learned",
        )

    def compute(self, values: Values) -> Values:
        ids, mask = values["text_ids"], values["text_mask"]
        given = values.get("has_text")
        out = {"has_text": mask.any(dim=1) if given is None else given & mask.any(dim=1)}  # (B,)
        if self.questions:
            ids = _stack_rows(ids, values["question_ids"], self.pad_id)  # (2B, T)
            mask = _stack_rows(mask, values["question_mask"], False)  # (2B, T)
        out["text"] = self.embedding(ids)  # (R, T, Ht), or (R, T' / tp, Ht)
        out["text_keys"] = self.embedding.layout.pad_mask(mask)  # (R, T')
        return out


class AudioEmbeddingLayer(StreamLayer):
    """audio (B, S) waveform, audio_lengths (B,) -> audio features (B, N+1, Ha) (this rank's slice
    under sequence parallelism) and audio_real (B, N+1) bool, the real (non-padding) tokens. A row
    without audio (length 0) is encoded as its silent padding, as the plain model does."""

    PLAIN_NAMES = {"embedding": "audio_encoder.embedding"}

    def __init__(
        self,
        config: ModelConfig,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
        fields: Optional[StreamFields] = None,
    ) -> None:
        super().__init__(fields or _DEFAULT)
        audio = config.audio
        self.spectrogram = LogMelSpectrogram(
            sample_rate=audio.sample_rate, n_fft=audio.n_fft, hop_length=audio.hop_length, n_mels=audio.n_mels,
            mean=audio.mean, std=audio.std,
        )  # fmt: skip
        self.embedding = AudioPatchEmbedding(
            audio.n_mels, audio.max_frames, (audio.patch_frequency, audio.patch_time), audio.hidden_size, init, group,
            sequence_parallel, config.dropout,
        )  # fmt: skip

    def compute(self, values: Values) -> Values:
        waveform, lengths = values["audio"], values["audio_lengths"]
        limit = self.embedding.max_frames * self.spectrogram.hop_length - 1
        if waveform.shape[1] > limit:
            raise ValueError(
                f"audio of {waveform.shape[1]} samples is longer than the {limit} samples model.audio.max_seconds "
                "covers: cut the audio shorter or raise model.audio.max_seconds"
            )
        lengths = torch.where(lengths > 0, lengths, waveform.shape[1])  # (B,)
        spectrogram, frame_mask = self.spectrogram(waveform, lengths)  # (B, M, F), (B, F)
        real = self.embedding.patch_mask(frame_mask)  # (B, N + 1)
        return {"audio": self.embedding(spectrogram), "audio_real": real}


class BlockLayer(StreamLayer):
    """Transformer block ``index`` of one modality's tower, applied to that modality's stream.

    With ``activation_checkpointing`` on (set by :func:`set_activation_checkpointing`), the block
    is recomputed in the backward pass by :func:`megamm.parallel.checkpoint`, as in the
    single-process model.
    """

    PLAIN_NAMES = {"block": "{modality}_encoder.transformer.layers.{index}"}

    def __init__(
        self,
        config: ModelConfig,
        modality: str,
        index: int,
        group: ProcessGroup,
        init: WeightInit,
        sequence_parallel: bool = False,
        fields: Optional[StreamFields] = None,
    ) -> None:
        super().__init__(fields or _DEFAULT)
        tower = getattr(config, modality)
        self.modality = modality
        attention = tower_attention(tower)[index]
        with init.seeded(f"{modality}.block.{index}"):
            self.block = TransformerBlock(
                tower.hidden_size, tower.num_heads, tower.ffn_size, group, init, tower.num_layers,
                sequence_parallel, config.dropout, config.attention_dropout, attention,
            )  # fmt: skip
        self.image_tokens = (config.image.image_size // config.image.patch_size) ** 2 + 1
        self.activation_checkpointing = False

    def compute(self, values: Values) -> Values:
        x = values[self.modality]
        if self.modality == "text":
            padding = values["text_keys"]  # (R, T'), padded by the text embedding under sequence parallelism
        elif self.modality == "audio":
            padding = self.block.layout.pad_mask(values["audio_real"])  # (B, T')
        else:  # the padding that sequence parallelism added, as ImagePatchEmbedding.key_padding_mask
            padding = self.block.layout.padding_mask(self.image_tokens, x.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        return {self.modality: checkpoint(self.block, x, padding) if recompute else self.block(x, padding)}


class HeadLayer(StreamLayer):
    """One tower's final LayerNorm, pooling (class token / masked mean) and projection:
    ``{modality}_emb`` (B, E); with ``tokens`` also every token's features ``{modality}_tokens``
    (B, N, H), whole on every rank. The text head of stacked captions and questions splits them:
    text_emb / text_tokens / text_pooled of the captions, question_tokens / question_pooled."""

    PLAIN_NAMES = {"final_norm": "{modality}_encoder.transformer.final_norm", "projection": "{modality}_projection"}

    def __init__(
        self,
        config: ModelConfig,
        modality: str,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
        tokens: bool = False,
        questions: bool = False,
        fields: Optional[StreamFields] = None,
    ) -> None:
        super().__init__(fields or _DEFAULT)
        hidden = getattr(config, modality).hidden_size
        self.modality = modality
        self.tokens = tokens
        self.questions = questions
        self.image_tokens = (config.image.image_size // config.image.patch_size) ** 2 + 1
        self.layout = SequenceLayout(group, sequence_parallel)
        self.final_norm = SequenceParallelLayerNorm(hidden, group, sequence_parallel)
        self.projection = Projection(modality, hidden, config.embed_dim, init)

    def compute(self, values: Values) -> Values:
        m = self.modality
        x = self.final_norm(values[m])  # (B, T, H), or this rank's (B, T' / tp, H)
        if m != "text":
            pooled = pool_class_token(x, self.layout)  # (B, H)
            out = {f"{m}_emb": self.projection(pooled)}  # (B, E)
            if self.tokens:
                count = self.image_tokens if m == "image" else values["audio_real"].shape[1]
                out[f"{m}_tokens"] = self.layout.gather(x, count)  # (B, N, H)
            return out
        keys = values["text_keys"]  # (R, T')
        pooled = masked_mean(x, keys, self.layout)  # (R, Ht)
        rows = pooled.shape[0] // 2 if self.questions else pooled.shape[0]
        out = {"text_emb": self.projection(pooled[:rows]), "text_pooled": pooled[:rows]}
        if self.questions:
            out["question_pooled"] = pooled[rows:]
        if self.tokens:
            whole = self.layout.gather(x, _length(values, self.questions))  # (R, T, Ht)
            out["text_tokens"] = whole[:rows, : values["text_mask"].shape[1]]  # (B, T, Ht)
            if self.questions:
                out["question_tokens"] = whole[rows:, : values["question_mask"].shape[1]]  # (B, Tq, Ht)
        return out


def _length(values: Values, questions: bool) -> int:
    """The text tower's sequence length before sequence-parallel padding."""
    length = values["text_mask"].shape[1]
    return max(length, values["question_mask"].shape[1]) if questions else length


class TemperatureLayer(StreamLayer):
    """A contrastive head's learnable logit scale: writes ``{head}_scale`` = exp(scale) (1,).

    ``head`` is the plain model's module holding it (``contrastive``, ``contrastive_audio_text``,
    ...). Clamped like :class:`~megamm.model.heads.ContrastiveHead`'s (``CLAMP_ATTRIBUTE``).
    """

    PLAIN_NAMES = {"logit_scale": "{head}.logit_scale"}

    def __init__(self, config: ModelConfig, head: str = "contrastive", fields: Optional[StreamFields] = None) -> None:
        super().__init__(fields or _DEFAULT)
        self.head = head
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        setattr(self.logit_scale, CLAMP_ATTRIBUTE, (None, config.logit_scale_max))
        self.logit_scale_max = config.logit_scale_max

    def compute(self, values: Values) -> Values:
        return {f"{self.head}_scale": self.logit_scale.clamp(max=self.logit_scale_max).exp()}


class ContextLayer(StreamLayer):
    """A context modality's tokens at the text width: ``context_{m}`` (B, Tm, H) and
    ``context_{m}_mask`` (B, Tm), False over padding and in rows without the modality."""

    PLAIN_NAMES = {"projection": "context_projection.{modality}"}

    def __init__(self, config: ModelConfig, modality: str, init: WeightInit, fields: Optional[StreamFields] = None) -> None:
        super().__init__(fields or _DEFAULT)
        self.modality = modality
        self.projection = ContextProjection(modality, getattr(config, modality).hidden_size, config.text.hidden_size, init)

    def compute(self, values: Values) -> Values:
        m = self.modality
        x = self.projection(values[f"{m}_tokens"])  # (B, Tm, H)
        if m == "audio":
            real = values["audio_real"]  # (B, Tm)
        else:
            real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return {f"context_{m}": x, f"context_{m}_mask": real & values[f"has_{m}"][:, None]}


# ----------------------------------------------------------------------------------------------
# Fusion, matching and question answering


class FusionInputLayer(StreamLayer):
    """The fusion's rows: the image-text matching's 3B pairs (each image with its caption, with a
    hard negative caption, each caption with a hard negative image; their context the image only)
    and the B questions (their context every modality), stacked in that order.

    Writes fusion_text (R, T, H) and fusion_text_mask (R, T); for the gated kind the joined
    context fusion_context (R, sum Tm, H) with fusion_context_mask, for the others each
    modality's fusion_context_{m} with its mask, and for the late kinds (concat, weighted)
    fusion_text_pooled (R, H). Also itm_weight (3B,) bool (the pairs with both sides),
    vqa_target (B,) (the answer, -1 where unanswerable) and answerable (B,) bool. No parameters.
    """

    PLAIN_NAMES: dict[str, str] = {}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup = None, fields: Optional[StreamFields] = None
    ) -> None:
        super().__init__(fields or _DEFAULT)
        self.group = group
        self.kind = config.fusion.kind
        self.itm = config.objectives.itm > 0
        self.questions = config.uses_questions
        self.context_modalities = tuple(m for m in config.modalities if m != "text")
        self.pad_id = config.text.pad_id

    def _negatives(self, values: Values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (3B,), texts (3B,), itm_weight (3B,) bool) of the matching rows."""
        valid = values["has_image"] & values["has_text"]  # (B,)
        if not self.training:  # evaluation reads no matching loss (and a batch may have one row): no mining
            index = torch.arange(valid.shape[0], device=valid.device)
            images = torch.cat([index, index, index])  # (3B,)
            return images, images, valid[images]
        with torch.no_grad():
            scale = values["contrastive_scale"].detach()
            similarity = scale * values["image_emb"].detach() @ values["text_emb"].detach().T  # (B, B)
        return matching_pairs(similarity, valid, batch_generator(values["text_ids"]), self.group)

    def compute(self, values: Values) -> Values:
        text, text_mask, pooled = [], [], []
        contexts: dict[str, list[torch.Tensor]] = {m: [] for m in self.context_modalities}
        masks: dict[str, list[torch.Tensor]] = {m: [] for m in self.context_modalities}
        out: Values = {}
        if self.itm:
            images, texts, out["itm_weight"] = self._negatives(values)
            text.append(values["text_tokens"][texts])  # (3B, T, H)
            text_mask.append(values["text_mask"][texts])
            pooled.append(values["text_pooled"][texts] if self.kind in ("concat", "weighted") else None)
            for m in self.context_modalities:
                mask = values[f"context_{m}_mask"][images]
                contexts[m].append(values[f"context_{m}"][images])  # (3B, Tm, H)
                masks[m].append(mask if m == "image" else torch.zeros_like(mask))  # the image only
        if self.questions:
            question_mask = values["question_mask"]
            text.append(values["question_tokens"])  # (B, Tq, H)
            text_mask.append(question_mask)
            pooled.append(values["question_pooled"] if self.kind in ("concat", "weighted") else None)
            for m in self.context_modalities:
                contexts[m].append(values[f"context_{m}"])
                masks[m].append(values[f"context_{m}_mask"])
            has_context = torch.stack([values[f"context_{m}_mask"].any(dim=1) for m in self.context_modalities])
            answerable = question_mask.any(dim=1) & has_context.any(dim=0)  # (B,)
            out["answerable"] = answerable
            if "answer" in values:
                out["vqa_target"] = values["answer"].masked_fill(~answerable, NO_ANSWER)  # (B,)
        out["fusion_text"] = text[0] if len(text) == 1 else _stack_rows(text[0], text[1], 0.0)  # (R, T, H)
        out["fusion_text_mask"] = text_mask[0] if len(text) == 1 else _stack_rows(text_mask[0], text_mask[1], False)
        context = {m: torch.cat(parts) for m, parts in contexts.items()}  # (R, Tm, H)
        context_mask = {m: torch.cat(parts) for m, parts in masks.items()}  # (R, Tm)
        if self.kind == "gated":
            out["fusion_context"] = torch.cat([context[m] for m in self.context_modalities], dim=1)  # (R, sum Tm, H)
            out["fusion_context_mask"] = torch.cat([context_mask[m] for m in self.context_modalities], dim=1)
        else:
            for m in self.context_modalities:
                out[f"fusion_context_{m}"], out[f"fusion_context_{m}_mask"] = context[m], context_mask[m]
        if self.kind in ("concat", "weighted"):
            out["fusion_text_pooled"] = torch.cat(pooled)  # (R, H)
        return out


def _rows(config: ModelConfig, total: int) -> tuple[int, int]:
    """(matching rows, question rows) of a fused stream of ``total`` rows (3B + B, 3B or B)."""
    itm, questions = config.objectives.itm > 0, config.uses_questions
    if itm and questions:
        return 3 * total // 4, total // 4
    return (total, 0) if itm else (0, total)


class FusionBlockLayer(StreamLayer):
    """Transformer block ``index`` of the gated fusion stream: fusion_text (R, T, H)."""

    PLAIN_NAMES = {"block": "fusion.blocks.{index}"}

    def __init__(
        self, config: ModelConfig, index: int, group: ProcessGroup, init: WeightInit,
        fields: Optional[StreamFields] = None,
    ) -> None:  # fmt: skip
        super().__init__(fields or _DEFAULT)
        fusion, hidden = config.fusion, config.text.hidden_size
        with init.seeded(f"fusion.block.{index}"):
            self.block = TransformerBlock(
                hidden, fusion.num_heads, fusion.ffn_size(hidden), group, init, fusion.num_layers, False,
                config.dropout, config.attention_dropout,
            )  # fmt: skip

    def compute(self, values: Values) -> Values:
        return {"fusion_text": self.block(values["fusion_text"], values["fusion_text_mask"])}


class GatedLayer(StreamLayer):
    """The gated cross-attention block after fusion block ``index``: fusion_text (R, T, H) reads
    the joined context (rows without any context pass unchanged)."""

    PLAIN_NAMES = {"gated": "fusion.gated.{index}"}

    def __init__(
        self, config: ModelConfig, index: int, group: ProcessGroup, init: WeightInit,
        fields: Optional[StreamFields] = None,
    ) -> None:  # fmt: skip
        super().__init__(fields or _DEFAULT)
        fusion, hidden = config.fusion, config.text.hidden_size
        self.gated = GatedCrossAttentionBlock(
            f"fusion.gated.{index}", hidden, hidden, fusion.num_heads, fusion.ffn_size(hidden), group, init,
            fusion.num_layers, config.dropout, config.attention_dropout,
        )  # fmt: skip

    def compute(self, values: Values) -> Values:
        x = self.gated(values["fusion_text"], values["fusion_context"], values["fusion_context_mask"])
        return {"fusion_text": x}


class FusionNormLayer(StreamLayer):
    """The gated fusion's final LayerNorm: fused_pooled (R, H), the masked mean of every row, and
    the question rows' tokens fused_tokens (B, Tq, H) with fused_mask (B, Tq)."""

    PLAIN_NAMES = {"final_norm": "fusion.final_norm"}

    def __init__(self, config: ModelConfig, fields: Optional[StreamFields] = None) -> None:
        super().__init__(fields or _DEFAULT)
        self.config = config
        self.final_norm = SequenceParallelLayerNorm(config.text.hidden_size)

    def compute(self, values: Values) -> Values:
        mask = values["fusion_text_mask"]  # (R, T)
        x = self.final_norm(values["fusion_text"])  # (R, T, H)
        out = {"fused_pooled": masked_mean(x, mask)}  # (R, H)
        itm_rows, question_rows = _rows(self.config, x.shape[0])
        if question_rows:
            length = values["question_mask"].shape[1]
            out["fused_tokens"], out["fused_mask"] = x[itm_rows:, :length], mask[itm_rows:, :length]
        return out


class FusionLayer(StreamLayer):
    """The whole fusion encoder of the kinds ``bottleneck``, ``concat`` and ``weighted``, over the
    matching rows (task ``itm``) and the question rows (task ``vqa``): fused_pooled (R, H), and the
    question rows' fused_tokens / fused_mask."""

    PLAIN_NAMES = {"fusion": "fusion"}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup, init: WeightInit, fields: Optional[StreamFields] = None
    ) -> None:
        super().__init__(fields or _DEFAULT)
        self.config = config
        self.context_modalities = tuple(m for m in config.modalities if m != "text")
        self.fusion = FusionEncoder(
            config.fusion, config.text.hidden_size, self.context_modalities, group, init,
            dropout=config.dropout, attention_dropout=config.attention_dropout,
        )  # fmt: skip

    def compute(self, values: Values) -> Values:
        text, mask = values["fusion_text"], values["fusion_text_mask"]
        itm_rows, question_rows = _rows(self.config, text.shape[0])
        pooled, out = [], {}
        for task, rows in (("itm", slice(0, itm_rows)), ("vqa", slice(itm_rows, itm_rows + question_rows))):
            if rows.stop == rows.start:
                continue
            context = {m: values[f"fusion_context_{m}"][rows] for m in self.context_modalities}
            masks = {m: values[f"fusion_context_{m}_mask"][rows] for m in self.context_modalities}
            representations = {m: context[m][:, 0] for m in self.context_modalities}
            if "fusion_text_pooled" in values:
                representations["text"] = values["fusion_text_pooled"][rows]
            fused = self.fusion(text[rows], mask[rows], context, masks, representations, task)
            pooled.append(fused.pooled)
            if task == "vqa":
                out["fused_tokens"], out["fused_mask"] = fused.tokens, fused.mask
        out["fused_pooled"] = torch.cat(pooled)  # (R, H)
        return out


class ITMHeadLayer(StreamLayer):
    """Image-text matching: the matching rows' logits (3B, 2) against labels 1 (the B positives)
    and 0, weighted by itm_weight; writes loss_itm (1,)."""

    PLAIN_NAMES = {"head": "itm_head"}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup, init: WeightInit, fields: Optional[StreamFields] = None
    ) -> None:
        super().__init__(fields or _DEFAULT)
        self.config = config
        self.head = ImageTextMatchingHead(config.text.hidden_size, group, init)

    def compute(self, values: Values) -> Values:
        weight = values["itm_weight"]  # (3B,)
        loss, _ = self.head.pairs_loss(values["fused_pooled"][: weight.shape[0]], weight)
        return {"loss_itm": _scalar(loss)}


class VQAHeadLayer(StreamLayer):
    """Answer classification of the question rows (the last B of fused_pooled); writes loss_vqa (1,)."""

    PLAIN_NAMES = {"head": "vqa_head"}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup, init: WeightInit, fields: Optional[StreamFields] = None
    ) -> None:
        super().__init__(fields or _DEFAULT)
        self.head = VQAClassifier(config.text.hidden_size, config.objectives.num_answers, group, init)

    def compute(self, values: Values) -> Values:
        target = values["vqa_target"]  # (B,)
        pooled = values["fused_pooled"][-target.shape[0] :]  # (B, H)
        return {"loss_vqa": _scalar(self.head.loss(pooled, target))}


# ----------------------------------------------------------------------------------------------
# Decoder


class DecoderTokenEmbedding(nn.Module):
    """The decoder's vocabulary-parallel token table (piece ``"decoder.embedding"``), tied: as a
    layer (``forward``) it looks up the caption's and the answer's input tokens (all but the last)
    into decoder_caption / decoder_answer (B, T-1, H); :class:`DecoderHead` is its LM head."""

    PLAIN_NAMES = {"token_embedding": "decoder.token_embedding"}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup, init: WeightInit, fields: Optional[StreamFields] = None
    ) -> None:
        super().__init__()
        self.fields = fields or _DEFAULT
        self.group = group
        self.captions = config.objectives.captioning > 0
        self.answers = config.objectives.vqa_generative > 0
        text = config.text
        with init.seeded("decoder.embedding"):
            self.token_embedding = VocabParallelEmbedding(
                text.vocab_size, text.hidden_size, group, init_method=init.token_embedding()
            )

    def compute(self, values: Values) -> Values:
        out = {}
        if self.captions:
            out["decoder_caption"] = self.token_embedding(values["text_ids"][:, :-1])  # (B, T - 1, H)
        if self.answers:
            out["decoder_answer"] = self.token_embedding(values["answer_ids"][:, :-1])  # (B, T - 1, H)
        return out

    def forward(self, inputs: Stream) -> Stream:
        return _run(self.compute, self.fields, inputs)


class DecoderPositionLayer(StreamLayer):
    """The decoder's position embedding (learned positions; none with rotary ones) and its
    embedding dropout; also the inputs of the decoder's blocks and losses: the captions' context
    (image and audio tokens joined, caption_context (B, sum Tm, H) with its mask) and next-token
    targets caption_target / answer_target (B, T-1), -100 where nothing is predicted."""

    PLAIN_NAMES = {"position_embedding": "decoder.position_embedding"}

    def __init__(self, config: ModelConfig, init: WeightInit, fields: Optional[StreamFields] = None) -> None:
        super().__init__(fields or _DEFAULT)
        text, decoder = config.text, config.decoder
        self.dropout = config.dropout
        self.layout = SequenceLayout(None, False)
        self.captions = config.objectives.captioning > 0
        self.answers = config.objectives.vqa_generative > 0
        self.context_modalities = tuple(m for m in config.modalities if m != "text")
        self.position_embedding: Optional[nn.Parameter] = None
        if decoder.positions == "learned":
            with init.seeded("decoder.embedding"):  # after the token table, as TextDecoder draws them
                init.token_embedding()(torch.empty(text.vocab_size, text.hidden_size))
                self.position_embedding = nn.Parameter(torch.empty(text.max_length, text.hidden_size))
                init.position()(self.position_embedding)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.position_embedding is not None:
            x = x + self.position_embedding[: x.shape[1]].unsqueeze(0)  # (B, T - 1, H)
        return hidden_dropout(x, self.dropout, self.training, self.layout)

    def compute(self, values: Values) -> Values:
        out: Values = {}
        if self.captions:
            joined_mask = torch.cat([values[f"context_{m}_mask"] for m in self.context_modalities], dim=1)
            out["caption_context"] = torch.cat([values[f"context_{m}"] for m in self.context_modalities], dim=1)
            out["caption_context_mask"] = joined_mask  # (B, sum Tm)
            mask = values["text_mask"] & (values["has_text"] & joined_mask.any(dim=1))[:, None]  # (B, T)
            out["caption_target"] = values["text_ids"][:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
            out["decoder_caption"] = self._embed(values["decoder_caption"])
        if self.answers:
            mask = values["answer_mask"] & values["answerable"][:, None]  # (B, T)
            out["answer_target"] = values["answer_ids"][:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
            out["decoder_answer"] = self._embed(values["decoder_answer"])
        return out


class DecoderBlockLayer(StreamLayer):
    """Decoder block ``index`` on both decoder streams: captions attend to caption_context,
    answers to the fused question (fused_tokens)."""

    PLAIN_NAMES = {"block": "decoder.layers.{index}"}

    def __init__(
        self, config: ModelConfig, index: int, group: ProcessGroup, init: WeightInit,
        fields: Optional[StreamFields] = None,
    ) -> None:  # fmt: skip
        super().__init__(fields or _DEFAULT)
        decoder, hidden = config.decoder, config.text.hidden_size
        with init.seeded(f"decoder.block.{index}"):
            self.block = DecoderBlock(
                hidden, hidden, decoder.num_heads, decoder.ffn_size(hidden), group, init, decoder.num_layers,
                config.dropout, config.attention_dropout, rotary=decoder.positions == "rotary",
            )  # fmt: skip

    def compute(self, values: Values) -> Values:
        out = {}
        if "decoder_caption" in values:
            out["decoder_caption"] = self.block(
                values["decoder_caption"], values["caption_context"], values["caption_context_mask"]
            )
        if "decoder_answer" in values:
            out["decoder_answer"] = self.block(values["decoder_answer"], values["fused_tokens"], values["fused_mask"])
        return out


class DecoderNormLayer(StreamLayer):
    """The decoder's final LayerNorm, on both decoder streams."""

    PLAIN_NAMES = {"final_norm": "decoder.final_norm"}

    def __init__(self, config: ModelConfig, fields: Optional[StreamFields] = None) -> None:
        super().__init__(fields or _DEFAULT)
        self.final_norm = SequenceParallelLayerNorm(config.text.hidden_size)

    def compute(self, values: Values) -> Values:
        return {name: self.final_norm(values[name]) for name in ("decoder_caption", "decoder_answer") if name in values}


class DecoderHead:
    """The tied LM head (``forward_fn`` of the decoder embedding's second ``TiedLayerSpec``): each
    tensor-parallel rank scores the hidden states against its rows of the token table (scaled by
    1 / sqrt(H), as :meth:`~megamm.model.decoder.TextDecoder.logits`), and the vocabulary-parallel
    cross entropy (label smoothing as configured) averaged over the predicted tokens gives
    loss_captioning and loss_vqa_generative (1,)."""

    def __init__(self, config: ModelConfig, fields: StreamFields) -> None:
        self.fields = fields
        self.logit_scale = config.text.hidden_size**-0.5
        self.label_smoothing = config.decoder.label_smoothing

    def __call__(self, module: DecoderTokenEmbedding, inputs: Stream) -> Stream:
        def compute(values: Values) -> Values:
            out = {}
            for stream, target, name in (
                ("decoder_caption", "caption_target", "captioning"),
                ("decoder_answer", "answer_target", "vqa_generative"),
            ):
                if stream not in values:
                    continue
                hidden = copy_to_group(values[stream] * self.logit_scale, module.group)  # (B, T - 1, H)
                logits = F.linear(hidden, module.token_embedding.weight)  # (B, T - 1, V / tp)
                targets = values[target]
                total = vocab_parallel_cross_entropy(
                    logits, targets, group=module.group, ignore_index=IGNORE_INDEX,
                    label_smoothing=self.label_smoothing, reduction="sum",
                )  # fmt: skip
                out[f"loss_{name}"] = _scalar(total / (targets != IGNORE_INDEX).sum().clamp_min(1))
            return out

        return _run(compute, self.fields, inputs)


# ----------------------------------------------------------------------------------------------
# Losses


class ContrastiveLoss:
    """The dual encoder's loss function: symmetric InfoNCE over the data-parallel group's batch,
    from the stream (image_emb, text_emb, contrastive_scale)."""

    def __init__(self, dp_group: ProcessGroup) -> None:
        self.dp_group = dp_group

    def __call__(self, outputs: Stream, labels: Any) -> torch.Tensor:
        image_emb, text_emb, scale = outputs
        return contrastive_loss(image_emb, text_emb, scale, self.dp_group)


class MultiModalLoss:
    """The whole model's loss function: each contrastive pair's InfoNCE over the data-parallel
    group (rows lacking either side masked), plus the losses the layers computed, weighted by
    ``model.objectives`` and summed in the plain model's order. Each call's objectives' own losses
    are kept (floats) until :meth:`take_scored`."""

    def __init__(self, config: ModelConfig, dp_group: ProcessGroup, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self.dp_group = dp_group
        self.weights = config.objectives.weights()
        self.pairs = _pairs(config)
        self.scored: list[dict[str, float]] = []

    def __call__(self, outputs: Stream, labels: Any) -> torch.Tensor:
        values = dict(zip(self.fields, outputs))
        read: set[str] = set()
        losses: dict[str, torch.Tensor] = {}
        for pair in self.pairs:
            a, b = pair.split("_")
            scale = f"{CONTRASTIVE_HEADS[pair]}_scale"
            valid = values[f"has_{a}"] & values[f"has_{b}"]  # (B,)
            losses[pair] = contrastive_loss(values[f"{a}_emb"], values[f"{b}_emb"], values[scale], self.dp_group, valid)
            read |= {f"{a}_emb", f"{b}_emb", scale}
        for name in LOSS_OBJECTIVES:
            if f"loss_{name}" in values:
                losses[name] = values[f"loss_{name}"][0]
                read.add(f"loss_{name}")
        total = sum(self.weights[name] * loss for name, loss in losses.items())
        # Fields that arrive only for evaluation or for mining negatives still need a gradient
        # (DeepSpeed sends one back for every float a stage received): zero.
        for name, value in values.items():
            if name not in read and value.is_floating_point():
                total = total + (value * 0).sum()
        self.scored.append({name: float(loss.detach()) for name, loss in losses.items()})
        return total

    def take_scored(self) -> dict[str, float]:
        """Each objective's own loss, the mean over the calls since the last take (then forgotten)."""
        scored, self.scored = self.scored, []
        names = {name for losses in scored for name in losses}
        return {name: sum(losses[name] for losses in scored) / len(scored) for name in sorted(names)}


def _pairs(config: ModelConfig) -> tuple[str, ...]:
    return tuple(pair for pair in CONTRASTIVE_PAIRS if getattr(config.objectives, pair) > 0)


def _heads(config: ModelConfig) -> tuple[str, ...]:
    """The plain model's temperature modules: one per contrastive pair, and ``contrastive`` for
    mining the matching's negatives when image-text is no pair."""
    heads = [CONTRASTIVE_HEADS[pair] for pair in _pairs(config)]
    if "contrastive" not in heads and config.objectives.itm > 0:
        heads.insert(0, "contrastive")
    return tuple(heads)


# ----------------------------------------------------------------------------------------------
# The sequence of layers


_DEFAULT = StreamFields((), ())  # replaced by layer_specs; only for building a layer by hand


@dataclass
class _Piece:
    """One layer before its fields are known: what it is built from, reads and writes."""

    typename: type
    args: tuple[Any, ...]
    reads: frozenset[str]
    writes: frozenset[str]
    tied_forward: Optional[Callable[[StreamFields], Any]] = None
    """For the tied LM head: builds its ``forward_fn`` from its fields."""
    tied_fields: Optional[Callable[[], StreamFields]] = None
    """For both tied uses: the embedding's fields (the module's own), known once planned."""


def _piece(typename: type, *args: Any, reads: Sequence[str] = (), writes: Sequence[str] = ()) -> _Piece:
    return _Piece(typename, args, frozenset(reads), frozenset(writes))


def _plan(
    config: ModelConfig, parallel: ParallelState, init: WeightInit, sequence_parallel: bool
) -> tuple[list[_Piece], tuple[str, ...]]:
    """The layers in pipeline order and the fields the loss function reads."""
    group, sp = parallel.tp_group, sequence_parallel
    dual = config.is_dual_encoder
    objectives = config.objectives
    questions = config.uses_questions
    fusion = config.uses_fusion
    decoder = config.uses_decoder
    needs_context = fusion or decoder
    context_modalities = tuple(m for m in config.modalities if m != "text")
    towers = tuple(m for m in TOWERS if m in config.modalities)
    late = config.fusion.kind in ("concat", "weighted")

    given = ["has_image", "has_text"] if config.audio.enabled else []  # rows may lack either (see _INPUT_FIELDS)
    pieces = [
        _piece(ImageEmbeddingLayer, config, init, group, sp, reads=["image", *given[:1]], writes=["image", "has_image"]),
        _piece(
            TextEmbeddingLayer, config, group, init, sp, questions,
            reads=["text_ids", "text_mask", *given[1:], *(["question_ids", "question_mask"] if questions else [])],
            writes=["text", "text_keys", "has_text"],
        ),  # fmt: skip
    ]
    if config.audio.enabled:
        pieces.append(
            _piece(AudioEmbeddingLayer, config, init, group, sp, reads=["audio", "audio_lengths"], writes=["audio", "audio_real"])
        )
    for m in towers:
        mask = {"text": ["text_keys"], "audio": ["audio_real"], "image": []}[m]
        tower = getattr(config, m)
        pieces += [
            _piece(BlockLayer, config, m, i, group, init, sp, reads=[m, *mask], writes=[m]) for i in range(tower.num_layers)
        ]
        tokens = (m != "text" and needs_context) or (m == "text" and fusion)
        writes = [f"{m}_emb"] + ([f"{m}_tokens"] if tokens else [])
        reads = [m, *mask]
        if m == "text":
            writes += ["text_pooled"] + (["question_pooled", "question_tokens"] if questions else [])
            reads += (["text_mask"] + (["question_mask"] if questions else [])) if tokens else []
        pieces.append(_piece(HeadLayer, config, m, init, group, sp, tokens, questions, reads=reads, writes=writes))
    if needs_context:
        for m in context_modalities:
            reads = [f"{m}_tokens", f"has_{m}"] + (["audio_real"] if m == "audio" else [])
            pieces.append(_piece(ContextLayer, config, m, init, reads=reads, writes=[f"context_{m}", f"context_{m}_mask"]))
    heads = ("contrastive",) if dual else _heads(config)
    pieces += [_piece(TemperatureLayer, config, head, writes=[f"{head}_scale"]) for head in heads]

    context_fields = [f for m in context_modalities for f in (f"context_{m}", f"context_{m}_mask")]
    if fusion:
        reads = list(context_fields)
        writes = ["fusion_text", "fusion_text_mask"]
        if config.fusion.kind == "gated":
            writes += ["fusion_context", "fusion_context_mask"]
        else:
            writes += [f for m in context_modalities for f in (f"fusion_context_{m}", f"fusion_context_{m}_mask")]
        if late:
            writes.append("fusion_text_pooled")
        if objectives.itm > 0:
            reads += ["has_image", "has_text", "image_emb", "text_emb", "contrastive_scale", "text_ids", "text_tokens", "text_mask"]
            reads += ["text_pooled"] if late else []
            writes.append("itm_weight")
        if questions:
            reads += ["question_tokens", "question_mask"] + (["question_pooled"] if late else [])
            reads += ["answer"] if objectives.vqa > 0 else []
            writes += ["answerable"] + (["vqa_target"] if objectives.vqa > 0 else [])
        pieces.append(_piece(FusionInputLayer, config, group, reads=reads, writes=writes))
        fused = ["fused_pooled"] + (["fused_tokens", "fused_mask"] if questions else [])
        if config.fusion.kind == "gated":
            gated = gated_positions(config.fusion.num_layers, config.fusion.every)
            for i in range(config.fusion.num_layers):
                pieces.append(_piece(FusionBlockLayer, config, i, group, init, reads=["fusion_text", "fusion_text_mask"],
                                     writes=["fusion_text"]))  # fmt: skip
                if i in gated:
                    pieces.append(_piece(GatedLayer, config, i, group, init,
                                         reads=["fusion_text", "fusion_context", "fusion_context_mask"],
                                         writes=["fusion_text"]))  # fmt: skip
            reads = ["fusion_text", "fusion_text_mask"] + (["question_mask"] if questions else [])
            pieces.append(_piece(FusionNormLayer, config, reads=reads, writes=fused))
        else:
            reads = ["fusion_text", "fusion_text_mask"] + (["fusion_text_pooled"] if late else [])
            reads += [f for m in context_modalities for f in (f"fusion_context_{m}", f"fusion_context_{m}_mask")]
            pieces.append(_piece(FusionLayer, config, group, init, reads=reads, writes=fused))
        if objectives.itm > 0:
            pieces.append(_piece(ITMHeadLayer, config, group, init, reads=["fused_pooled", "itm_weight"], writes=["loss_itm"]))
        if objectives.vqa > 0:
            pieces.append(_piece(VQAHeadLayer, config, group, init, reads=["fused_pooled", "vqa_target"], writes=["loss_vqa"]))
    if decoder:
        captions, answers = objectives.captioning > 0, objectives.vqa_generative > 0
        streams = (["decoder_caption"] if captions else []) + (["decoder_answer"] if answers else [])
        embedding = _piece(
            DecoderTokenEmbedding, config, group, init,
            reads=(["text_ids"] if captions else []) + (["answer_ids"] if answers else []), writes=streams,
        )  # fmt: skip
        pieces.append(embedding)
        reads = list(streams)
        writes = list(streams)
        if captions:
            reads += context_fields + ["text_ids", "text_mask", "has_text"]
            writes += ["caption_context", "caption_context_mask", "caption_target"]
        if answers:
            reads += ["answer_ids", "answer_mask", "answerable"]
            writes += ["answer_target"]
        pieces.append(_piece(DecoderPositionLayer, config, init, reads=reads, writes=writes))
        reads = list(streams) + (["caption_context", "caption_context_mask"] if captions else [])
        reads += ["fused_tokens", "fused_mask"] if answers else []
        pieces += [
            _piece(DecoderBlockLayer, config, i, group, init, reads=reads, writes=streams)
            for i in range(config.decoder.num_layers)
        ]
        pieces.append(_piece(DecoderNormLayer, config, reads=streams, writes=streams))
        head = _piece(
            DecoderTokenEmbedding, config, group, init,
            reads=streams + (["caption_target"] if captions else []) + (["answer_target"] if answers else []),
            writes=(["loss_captioning"] if captions else []) + (["loss_vqa_generative"] if answers else []),
        )  # fmt: skip
        head.tied_forward = lambda fields: DecoderHead(config, fields)
        pieces.append(head)

    if dual:
        loss_reads: tuple[str, ...] = ("image_emb", "text_emb", "contrastive_scale")
    else:
        loss_reads = tuple(f"{m}_emb" for m in towers) + tuple(f"{h}_scale" for h in heads)
        loss_reads += tuple(f"has_{m}" for pair in _pairs(config) for m in pair.split("_"))
        loss_reads += tuple(f"loss_{name}" for name in LOSS_OBJECTIVES if getattr(objectives, name) > 0)
    return pieces, loss_reads


def _fields(pieces: list[_Piece], inputs: tuple[str, ...], loss_reads: tuple[str, ...]) -> list[StreamFields]:
    """Each layer's input and output field names: a field lives from the layer that writes it
    (or the inputs) to its last reader (or the loss function); fields in order of first appearance."""
    order: dict[str, int] = {}
    for name in inputs:
        order.setdefault(name, len(order))
    for piece in pieces:
        for name in sorted(piece.writes):
            order.setdefault(name, len(order))
    live = set(loss_reads)
    after: list[set[str]] = [set() for _ in pieces]
    for index in range(len(pieces) - 1, -1, -1):
        after[index] = set(live)
        live = (live - pieces[index].writes) | pieces[index].reads
    missing = live - set(inputs)
    if missing:
        raise ValueError(f"the pipeline's first layer needs {sorted(missing)}, which are not among its inputs {inputs}")

    def ordered(names: set[str]) -> tuple[str, ...]:
        return tuple(sorted(names, key=order.__getitem__))

    fields = []
    for index in range(len(pieces)):
        received = inputs if index == 0 else ordered(after[index - 1])
        fields.append(StreamFields(received, ordered(after[index])))
    if fields and set(fields[-1].outputs) != set(loss_reads):
        raise ValueError(f"the last layer gives {fields[-1].outputs}, the loss reads {loss_reads}")
    return fields


@dataclass
class Plan:
    """The pipeline of one config: its layer specs, the inputs' and the last stage's field names."""

    specs: list[LayerSpec]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def plan(
    config: ModelConfig, parallel: ParallelState, init: WeightInit, sequence_parallel: bool = False
) -> Plan:
    """The model's layers in pipeline order (see the module docstring), with their stream fields."""
    pieces, loss_reads = _plan(config, parallel, init, sequence_parallel)
    inputs = pipeline_inputs(config)
    fields = _fields(pieces, inputs, loss_reads)
    embedding_fields = next(
        (f for piece, f in zip(pieces, fields) if piece.typename is DecoderTokenEmbedding and piece.tied_forward is None),
        None,
    )
    specs: list[LayerSpec] = []
    for piece, layer_fields in zip(pieces, fields):
        if piece.typename is DecoderTokenEmbedding:
            forward_fn = None if piece.tied_forward is None else piece.tied_forward(layer_fields)
            specs.append(TiedLayerSpec(
                DECODER_KEY, DecoderTokenEmbedding, *piece.args, fields=embedding_fields, forward_fn=forward_fn,
                tied_weight_attr=["token_embedding.weight"],
            ))  # fmt: skip
        else:
            specs.append(LayerSpec(piece.typename, *piece.args, fields=layer_fields))
    return Plan(specs, inputs, fields[-1].outputs)


def layer_specs(
    config: ModelConfig, parallel: ParallelState, init: WeightInit, sequence_parallel: bool = False
) -> list[LayerSpec]:
    """The model's layers, in pipeline order (see the module docstring)."""
    return plan(config, parallel, init, sequence_parallel).specs


def plain_prefixes(config: ModelConfig) -> list[tuple[str, str]]:
    """``(pipeline-form prefix, plain-form prefix)`` of every layer's submodules (or parameters),
    in layer order.

    Derived from :func:`layer_specs`: layer ``i``'s submodule ``block`` is ``"i.block"`` in the
    pipeline form (``"tied_modules.<key>.block"`` for a ``TiedLayerSpec``, listed once per key)
    and its class's ``PLAIN_NAMES["block"]``, filled in with the layer's arguments
    (``modality``, ``index``, ``head``), in the plain one. A parameter's name in either form is its
    submodule's prefix followed by the same rest (``".attn.qkv.weight"``). A learned-position
    layer without positions (rotary) lists a prefix that no parameter has.

    Raises:
        TypeError: a layer class declares no ``PLAIN_NAMES``.
    """
    pairs: list[tuple[str, str]] = []
    tied: set[str] = set()
    for index, spec in enumerate(layer_specs(config, ParallelState.single(), weight_init(config, 0))):
        layer = spec.typename
        if not hasattr(layer, "PLAIN_NAMES"):
            raise TypeError(f"pipeline layer {index} ({layer.__name__}) declares no PLAIN_NAMES")
        if isinstance(spec, TiedLayerSpec):
            if spec.key in tied:
                continue
            tied.add(spec.key)
            owner = f"tied_modules.{spec.key}"
        else:
            owner = str(index)
        arguments = inspect.signature(layer).bind(*spec.module_args, **spec.module_kwargs).arguments
        pairs += [(f"{owner}.{sub}", plain.format(**arguments)) for sub, plain in layer.PLAIN_NAMES.items()]
    return pairs


class MultiModalPipeline(PipelineModule):
    """DeepSpeed ``PipelineModule`` of :func:`layer_specs` on our (pipe, data, model) grid.

    Built on every rank: each stage instantiates its own layers only. ``sequence_parallel``: see
    the module docstring. :attr:`input_names`: the first stage's input tuple
    (:func:`pipeline_inputs`); :attr:`output_names`: the last stage's output tuple, which holds
    every modality's embedding ``{modality}_emb``.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelState,
        partition: str = "parameters",
        seed: Optional[int] = None,
        sequence_parallel: bool = False,
    ) -> None:
        layout = plan(config, parallel, weight_init(config, seed), sequence_parallel)
        assert len(layout.specs) == config.num_pipeline_layers, (len(layout.specs), config.num_pipeline_layers)
        self._split = pipeline_split(partition, len(layout.specs), parallel.pp_size)
        topology = PipeModelDataParallelTopology(num_pp=parallel.pp_size, num_mp=parallel.tp_size, num_dp=parallel.dp_size)
        if config.is_dual_encoder:
            loss_fn: Any = ContrastiveLoss(parallel.dp_group)
        else:
            loss_fn = MultiModalLoss(config, parallel.dp_group, layout.outputs)
        super().__init__(
            layers=layout.specs,
            topology=topology,
            loss_fn=loss_fn,
            partition_method="uniform" if self._split is not None else partition,
            dynamic_shape=True,  # evaluation batches may be smaller than training micro-batches
        )
        self.input_names = layout.inputs
        self.output_names = layout.outputs

    def _partition_layers(self, method: str = "uniform") -> None:
        split: Optional[Sequence[int]] = getattr(self, "_split", None)
        if split is None:
            super()._partition_layers(method)
            return
        self.parts = list(split)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def stage_layers(self) -> list[tuple[int, int]]:
        """``(first, stop)`` layer indices of every stage."""
        return [(self.parts[s], self.parts[s + 1]) for s in range(self.num_stages)]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every encoder block of this stage in the backward pass (as the plain model
        recomputes its towers' blocks)."""
        for module in self.modules():
            if isinstance(module, BlockLayer):
                module.activation_checkpointing = enabled

    def take_objective_losses(self) -> dict[str, float]:
        """Each objective's own loss, the mean over the micro-batches the loss function scored since
        the last call (on the last stage; empty elsewhere and for the dual encoder)."""
        take = getattr(self.loss_fn, "take_scored", None)
        return take() if take is not None else {}


def stream_values(names: Sequence[str], stream: Stream) -> Mapping[str, torch.Tensor]:
    """A stream's tensors by field name."""
    return dict(zip(names, stream))


__all__ = [
    "AudioEmbeddingLayer",
    "BlockLayer",
    "ContextLayer",
    "ContrastiveLoss",
    "DecoderBlockLayer",
    "DecoderHead",
    "DecoderNormLayer",
    "DecoderPositionLayer",
    "DecoderTokenEmbedding",
    "FusionBlockLayer",
    "FusionInputLayer",
    "FusionLayer",
    "FusionNormLayer",
    "GatedLayer",
    "HeadLayer",
    "ITMHeadLayer",
    "ImageEmbeddingLayer",
    "MultiModalLoss",
    "MultiModalPipeline",
    "Plan",
    "StreamFields",
    "TemperatureLayer",
    "TextEmbeddingLayer",
    "VQAHeadLayer",
    "layer_specs",
    "pipeline_inputs",
    "plain_prefixes",
    "plan",
    "stream_values",
]
