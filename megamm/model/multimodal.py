"""MultiModalTransformer: text, image and audio encoders, fusion, a caption decoder and the heads.

What is built follows ``config.objectives`` (an objective at weight 0 and the modules only it
needs are left out) and ``config.audio.enabled``:

    image ──ImageEncoder──┬─ image_projection ─> image_emb ─┐
    text  ──TextEncoder───┼─ text_projection ──> text_emb  ─┼─ contrastive (each pair)
    audio ──AudioEncoder──┼─ audio_projection ─> audio_emb ─┘
                          └─ context_projection[m]: every image / audio token at the text width
                                 ├─> decoder (captioning: next caption token given image + audio)
    caption / question tokens ──┴─> fusion ─> itm_head (hard negatives), vqa_head, decoder (answers)

Any subset of modalities may be present: ``has_image``, ``has_text``, ``has_audio`` (B,) mark the
rows that have each; a modality missing from the call is missing in every row. Missing ones are
masked (a pair's contrastive loss skips rows lacking either side, the context mask hides their
tokens, and their targets count for nothing), yet every module runs on every call, on a
placeholder where the input is absent: every rank runs the same collectives in the same order,
which ZeRO-3 needs (its parameter gathers are collectives).

Every weight is drawn from ``seed`` (:func:`weight_init`) as a full master tensor in the random
stream of its piece, so any tensor-parallel or pipeline-parallel layout of the same seed gives the
same model. ``sequence_parallel``: Megatron's sequence parallelism inside the encoders (the
fusion and the decoder take whole sequences, gathered). ``config.dropout`` and
``config.attention_dropout`` act in training mode only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from megamm.config import CONTRASTIVE_PAIRS, ModelConfig
from megamm.model.blocks import EncoderOutput, TransformerStack, tower_attention
from megamm.model.decoder import TextDecoder
from megamm.model.encoders import AudioEncoder, ImageEncoder, TextEncoder
from megamm.model.fusion.encoder import Fused, FusionEncoder
from megamm.model.heads import ContrastiveHead, Projection
from megamm.model.init import WeightInit
from megamm.model.objectives import (
    NO_ANSWER,
    ImageTextMatchingHead,
    VQAClassifier,
    answer_loss,
    batch_generator,
    matching_pairs,
)
from megamm.parallel import ParallelState


def weight_init(config: ModelConfig, seed: Optional[int] = None) -> WeightInit:
    """The model's initialisation; ``seed=None`` draws the base seed from torch's global generator
    (so ``torch.manual_seed(s)`` before building fixes the model, as for any torch module)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # also when building on "meta"
    return WeightInit(config.init, config.init_std, config.token_embedding_std, seed)


CONTRASTIVE_HEADS = {"image_text": "contrastive", "audio_text": "contrastive_audio_text", "image_audio": "contrastive_image_audio"}
"""The module holding each pair's temperature (the image-text one keeps the dual encoder's name)."""


@dataclass
class ModelOutput(dict):
    """What :meth:`MultiModalTransformer.forward` returns: a dataclass that is also a dict
    (``output.loss`` or ``output["loss"]``), so that ZeRO-3's hooks find the tensors in it."""

    loss: Optional[torch.Tensor] = None
    """The weighted sum of :attr:`losses` (scalar); None without ``compute_loss``."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each objective's own (unweighted) loss, by its name in ``model.objectives``."""
    image_emb: Optional[torch.Tensor] = None
    """(B, E) L2-normalised, in the shared embedding space; likewise text_emb and audio_emb."""
    text_emb: Optional[torch.Tensor] = None
    audio_emb: Optional[torch.Tensor] = None
    itm_logits: Optional[torch.Tensor] = None
    """(B, 2) match logits of each row's own image and caption (class 1: match)."""
    vqa_logits: Optional[torch.Tensor] = None
    """(B, num_answers) answer logits of each row's question."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        dict.__setitem__(self, name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"ModelOutput has no field {key!r}")
        setattr(self, key, value)


class ContextProjection(nn.Module):
    """A modality's tokens at the text width, for the fusion layers and the decoder:
    LayerNorm + Linear, (B, N, Hm) -> (B, N, H). Replicated on every tensor-parallel rank (the
    layers it feeds sum its gradient over the group); drawn in the piece ``"{modality}.context"``."""

    def __init__(self, modality: str, input_size: int, output_size: int, init: WeightInit) -> None:
        super().__init__()
        with init.seeded(f"{modality}.context"):
            self.norm = nn.LayerNorm(input_size)
            self.linear = nn.Linear(input_size, output_size)
            init.linear(input_size)(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class MultiModalTransformer(nn.Module):
    """The multi-modal model of ``config`` (a ``model`` section of a recipe); see the module docstring.

    Inputs to :meth:`forward` are token tensors (or, with a :attr:`processor` attached, raw
    strings, PIL images and NumPy waveforms); every data-parallel rank must pass the same batch
    size. The encoders are reachable one by one (:meth:`encode_text`, :meth:`encode_image`,
    :meth:`encode_audio`), and :meth:`generate` writes captions and answers.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: Optional[ParallelState] = None,
        seed: Optional[int] = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        parallel = parallel or ParallelState.single()
        self.config = config
        self.dp_group = parallel.dp_group
        self.processor: Any = None
        """Turns raw strings, images and waveforms into tensors (:class:`megamm.data.Processor`); None: tensors only."""
        text, image, audio, objectives = config.text, config.image, config.audio, config.objectives
        group = parallel.tp_group
        init = weight_init(config, seed)
        dropouts = {"dropout": config.dropout, "attention_dropout": config.attention_dropout}

        def tower(settings: Any) -> dict[str, Any]:
            """The arguments every encoder takes, from its tower's config."""
            return dict(
                hidden_size=settings.hidden_size, num_layers=settings.num_layers, num_heads=settings.num_heads,
                ffn_size=settings.ffn_size, group=group, init=init, sequence_parallel=sequence_parallel,
                attention=tower_attention(settings), **dropouts,
            )  # fmt: skip

        self.text_encoder = TextEncoder(
            vocab_size=text.vocab_size, max_length=text.max_length, learned_positions=text.positions == "learned",
            **tower(text),
        )  # fmt: skip
        self.image_encoder = ImageEncoder(
            image_size=image.image_size, patch_size=image.patch_size, channels=image.channels, **tower(image)
        )
        self.audio_encoder: Optional[AudioEncoder] = None
        if audio.enabled:
            self.audio_encoder = AudioEncoder(
                n_mels=audio.n_mels, max_frames=audio.max_frames, patch_size=(audio.patch_frequency, audio.patch_time),
                sample_rate=audio.sample_rate, n_fft=audio.n_fft, hop_length=audio.hop_length, mean=audio.mean,
                std=audio.std, **tower(audio),
            )  # fmt: skip
        self.text_projection = Projection("text", text.hidden_size, config.embed_dim, init)
        self.image_projection = Projection("image", image.hidden_size, config.embed_dim, init)
        if audio.enabled:
            self.audio_projection = Projection("audio", audio.hidden_size, config.embed_dim, init)
        self.pairs = tuple(pair for pair in CONTRASTIVE_PAIRS if getattr(objectives, pair) > 0)
        for pair in self.pairs:
            head = ContrastiveHead(config.logit_scale_init, config.logit_scale_max, parallel.dp_group)
            setattr(self, CONTRASTIVE_HEADS[pair], head)
        if "image_text" not in self.pairs and objectives.itm > 0:  # hard negatives need the image-text scores
            self.contrastive = ContrastiveHead(config.logit_scale_init, config.logit_scale_max, parallel.dp_group)

        self.context_modalities = tuple(m for m in config.modalities if m != "text")
        self.needs_context = config.uses_fusion or config.uses_decoder
        if self.needs_context:
            self.context_projection = nn.ModuleDict(
                {m: ContextProjection(m, getattr(config, m).hidden_size, text.hidden_size, init) for m in self.context_modalities}
            )
        self.fusion: Optional[FusionEncoder] = None
        if config.uses_fusion:
            self.fusion = FusionEncoder(config.fusion, text.hidden_size, self.context_modalities, group, init, **dropouts)
        if objectives.itm > 0:
            self.itm_head = ImageTextMatchingHead(text.hidden_size, group, init)
        if objectives.vqa > 0:
            self.vqa_head = VQAClassifier(text.hidden_size, objectives.num_answers, group, init)
        self.decoder: Optional[TextDecoder] = None
        if config.uses_decoder:
            decoder = config.decoder
            self.decoder = TextDecoder(
                vocab_size=text.vocab_size,
                max_length=text.max_length,
                hidden_size=text.hidden_size,
                num_layers=decoder.num_layers,
                num_heads=decoder.num_heads,
                ffn_size=decoder.ffn_size(text.hidden_size),
                context_size=text.hidden_size,
                group=group,
                init=init,
                positions=decoder.positions,
                label_smoothing=decoder.label_smoothing,
                **dropouts,
            )

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every encoder block in the backward pass instead of keeping its activations."""
        for module in self.modules():
            if isinstance(module, TransformerStack):
                module.activation_checkpointing = enabled

    # -- inputs ----------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.text_projection.linear.weight.device

    def _prepare(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Raw inputs through the processor, and placeholders for the modalities the call lacks."""
        raw = {key: inputs.pop(key) for key in ("text", "question") if inputs.get(key) is not None}
        for key in ("image", "audio"):
            value = inputs.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                raw[key] = inputs.pop(key)
        if "text" in raw and isinstance(raw["text"], torch.Tensor):  # token ids given as text=
            ids = raw.pop("text")
            inputs["text_ids"], inputs["text_mask"] = ids, ids != self.config.text.pad_id
        if raw:
            if self.processor is None:
                raise ValueError(
                    f"raw {', '.join(sorted(raw))} given but no processor is attached: pass tensors, or load the "
                    "model with MultiModalTransformer.from_pretrained (which attaches one)"
                )
            inputs.update(self.processor(**raw))
        device = self._device()
        tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        present = [k for k in ("image", "text_ids", "audio", "question_ids") if tensors.get(k) is not None]
        if not present:
            raise ValueError("no input: give at least one of image, text (text_ids), audio or question")
        batch = tensors[present[0]].shape[0]
        text, image = self.config.text, self.config.image
        if tensors.get("text_ids") is None:
            ids = torch.full((batch, text.max_length), text.pad_id, dtype=torch.int64, device=device)
            ids[:, 0] = text.bos_id
            tensors["text_ids"], tensors["text_mask"] = ids, ids != text.pad_id
            tensors["has_text"] = torch.zeros(batch, dtype=torch.bool, device=device)
        elif tensors.get("text_mask") is None:
            tensors["text_mask"] = tensors["text_ids"] != text.pad_id
        if tensors.get("has_text") is None:
            tensors["has_text"] = tensors["text_mask"].any(dim=1)
        if tensors.get("image") is None:
            tensors["image"] = torch.zeros(batch, image.channels, image.image_size, image.image_size, device=device)
            tensors["has_image"] = torch.zeros(batch, dtype=torch.bool, device=device)
        elif tensors.get("has_image") is None:
            tensors["has_image"] = torch.ones(batch, dtype=torch.bool, device=device)
        if self.audio_encoder is not None:
            if tensors.get("audio") is None:
                tensors["audio"] = torch.zeros(batch, 1600, device=device)  # 0.1 s of silence, no valid sample
                tensors["audio_lengths"] = torch.zeros(batch, dtype=torch.int64, device=device)
                tensors["has_audio"] = torch.zeros(batch, dtype=torch.bool, device=device)
            if tensors.get("audio_lengths") is None:
                tensors["audio_lengths"] = torch.full((batch,), tensors["audio"].shape[1], dtype=torch.int64, device=device)
            if tensors.get("has_audio") is None:
                tensors["has_audio"] = tensors["audio_lengths"] > 0
        for key in ("image", "text_ids", "audio", "question_ids"):
            if tensors.get(key) is not None and tensors[key].shape[0] != batch:
                raise ValueError(f"{key} has {tensors[key].shape[0]} rows, {present[0]} has {batch}: give one row per sample")
        return tensors

    # -- encoders --------------------------------------------------------------------------------

    def encode_text(self, text_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_ids (B, T) (mask: the non-padding ids by default) -> L2-normalised (B, E)."""
        mask = text_ids != self.config.text.pad_id if text_mask is None else text_mask
        return self.text_projection(self.text_encoder(text_ids, mask))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, C, S, S), normalised pixels -> L2-normalised (B, E)."""
        return self.image_projection(self.image_encoder(image))

    def encode_audio(
        self, audio: torch.Tensor, audio_lengths: Optional[torch.Tensor] = None, sample_rate: Optional[int] = None
    ) -> torch.Tensor:
        """audio (B, S) mono waveform at ``model.audio.sample_rate``, lengths (B,) valid samples ->
        L2-normalised (B, E)."""
        if self.audio_encoder is None:
            raise ValueError("this model has no audio encoder (model.audio.enabled=false)")
        return self.audio_projection(self.audio_encoder(audio, audio_lengths, sample_rate))

    def _encode(self, t: dict[str, Any]) -> dict[str, EncoderOutput]:
        tokens = self.needs_context
        out = {
            "image": self.image_encoder.features(t["image"], tokens=tokens),
            "text": self.text_encoder.features(t["text_ids"], t["text_mask"], tokens=self.fusion is not None),
        }
        if self.audio_encoder is not None:
            # a row without audio is encoded as its (silent) padding, then masked by has_audio
            lengths = torch.where(t["audio_lengths"] > 0, t["audio_lengths"], t["audio"].shape[1])  # (B,)
            out["audio"] = self.audio_encoder.features(t["audio"], lengths, t.get("sample_rate"), tokens=tokens)
        return out

    def _context(
        self, encoded: dict[str, EncoderOutput], t: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every context modality's tokens at the text width (B, Tm, H) and their masks (B, Tm),
        False over padding and in rows without the modality."""
        tokens, masks = {}, {}
        for modality in self.context_modalities:
            out = encoded[modality]
            x = self.context_projection[modality](out.tokens)  # (B, Tm, H)
            real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if out.mask is None else out.mask
            tokens[modality], masks[modality] = x, real & t[f"has_{modality}"][:, None]
        return tokens, masks

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        image: Any = None,
        text_ids: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        compute_loss: Optional[bool] = None,
        **inputs: Any,
    ) -> ModelOutput:
        """Embeddings, head logits and (with ``compute_loss``; by default in training mode only)
        every objective's loss of one batch.

        Tensors: image (B, C, S, S), text_ids / text_mask (B, T), audio (B, S) with audio_lengths
        (B,), question_ids / question_mask (B, T), answer (B,) (-1: none), answer_ids /
        answer_mask (B, T), has_image / has_text / has_audio (B,) bool. Raw inputs with a
        processor: ``text=`` and ``question=`` strings, ``image=`` PIL images or arrays, ``audio=``
        NumPy waveforms.
        """
        t = self._prepare({"image": image, "text_ids": text_ids, "text_mask": text_mask, **inputs})
        compute_loss = self.training if compute_loss is None else compute_loss
        cfg = self.config
        encoded = self._encode(t)
        out = ModelOutput(
            image_emb=self.image_projection(encoded["image"].pooled),
            text_emb=self.text_projection(encoded["text"].pooled),
            audio_emb=self.audio_projection(encoded["audio"].pooled) if self.audio_encoder is not None else None,
        )
        context = self._context(encoded, t) if self.needs_context else None
        has_questions = t.get("question_ids") is not None
        if not compute_loss:
            if self.fusion is not None and has_questions and hasattr(self, "vqa_head"):
                out.vqa_logits = self.vqa_head(self._fuse_questions(t, encoded, context).pooled)
            return out
        dual = cfg.is_dual_encoder
        for pair in self.pairs:
            a, b = pair.split("_")
            valid = None if dual else t[f"has_{a}"] & t[f"has_{b}"]
            head = getattr(self, CONTRASTIVE_HEADS[pair])
            out.losses[pair] = head(getattr(out, f"{a}_emb"), getattr(out, f"{b}_emb"), valid)
        if self.decoder is not None and cfg.objectives.captioning > 0:
            joined = torch.cat([context[0][m] for m in self.context_modalities], dim=1)  # (B, sum Tm, H)
            joined_mask = torch.cat([context[1][m] for m in self.context_modalities], dim=1)  # (B, sum Tm)
            caption_mask = t["text_mask"] & (t["has_text"] & joined_mask.any(dim=1))[:, None]
            out.losses["captioning"] = self.decoder.loss(t["text_ids"], caption_mask, joined, joined_mask)
        if cfg.objectives.itm > 0:
            out.losses["itm"], out.itm_logits = self._matching_loss(t, encoded, context, out)
        if cfg.uses_questions:
            self._question_losses(t, encoded, context, out)
        weights = cfg.objectives.weights()
        out.loss = sum(weights[name] * loss for name, loss in out.losses.items())
        return out

    def _matching_loss(
        self, t: dict[str, Any], encoded: dict[str, EncoderOutput], context: Any, out: ModelOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-text matching over each row's own pair and two hard negatives (a caption for each
        image, an image for each caption) mined from the image-text similarities; pairs with a
        missing side count for nothing. Returns the loss and the positives' logits (B, 2)."""
        valid = t["has_image"] & t["has_text"]  # (B,)
        with torch.no_grad():
            similarity = self.contrastive.scale() * out.image_emb @ out.text_emb.T  # (B, B)
        generator = batch_generator(t["text_ids"])
        images, texts, weight = matching_pairs(similarity, valid, generator, self.itm_head.group)  # (3B,) each
        tokens, masks = context
        only_image = {m: (masks[m][images] if m == "image" else torch.zeros_like(masks[m][images])) for m in masks}
        fused = self._fuse(
            encoded["text"].tokens[texts], t["text_mask"][texts], {m: x[images] for m, x in tokens.items()},
            only_image, {"text": encoded["text"].pooled[texts]}, "itm",
        )  # fmt: skip
        loss, logits = self.itm_head.pairs_loss(fused.pooled, weight)  # (), (3B, 2)
        return loss, logits[: valid.shape[0]]

    def _fuse(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        tokens: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        pooled: dict[str, torch.Tensor],
        task: str,
    ) -> Fused:
        """The fusion encoder over a text stream and the context; the late kinds read each context
        modality's pooled representation as its first (class) token."""
        pooled = {**pooled, **{m: tokens[m][:, 0] for m in self.context_modalities}}
        return self.fusion(text, text_mask, tokens, masks, pooled, task)

    def _fuse_questions(self, t: dict[str, Any], encoded: dict[str, EncoderOutput], context: Any) -> Fused:
        question = self.text_encoder.features(t["question_ids"], t["question_mask"], tokens=True)
        tokens, masks = context
        return self._fuse(question.tokens, t["question_mask"], tokens, masks, {"text": question.pooled}, "vqa")

    def _question_losses(
        self, t: dict[str, Any], encoded: dict[str, EncoderOutput], context: Any, out: ModelOutput
    ) -> None:
        """VQA: the answer's class, and the answer's tokens through the decoder, given the fused
        question and context; rows without a question or any context count for nothing."""
        fused = self._fuse_questions(t, encoded, context)
        answerable = t["question_mask"].any(dim=1) & torch.stack(
            [context[1][m].any(dim=1) for m in self.context_modalities]
        ).any(dim=0)  # (B,)
        if hasattr(self, "vqa_head"):
            target = t["answer"].masked_fill(~answerable, NO_ANSWER)  # (B,)
            out.losses["vqa"], out.vqa_logits = self.vqa_head.loss(fused.pooled, target, return_logits=True)
        if self.config.objectives.vqa_generative > 0:
            answer_mask = t["answer_mask"] & answerable[:, None]
            out.losses["vqa_generative"] = answer_loss(self.decoder, t["answer_ids"], answer_mask, fused.tokens, fused.mask)

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        image: Any = None,
        audio: Any = None,
        question: Any = None,
        num_beams: int = 1,
        max_length: Optional[int] = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """Captions of the image and/or audio, or with a question (``question=`` strings, or
        ``question_ids`` / ``question_mask``) its answers: token ids (B, L), BOS first, padded
        after EOS (decode with the tokenizer, or ``processor.decode``). Every data-parallel rank
        must call it together (it stops when all of them are done: ZeRO-3 gathers collectively)."""
        if self.decoder is None:
            raise ValueError(
                "this model has no decoder: train it with model.objectives.captioning or vqa_generative above 0"
            )
        raw = {"image": image, "audio": audio, **inputs}
        if question is not None:
            raw["question"] = question
        t = self._prepare({k: v for k, v in raw.items() if v is not None})
        encoded = self._encode(t)
        tokens, masks = self._context(encoded, t)
        if t.get("question_ids") is not None:
            fused = self._fuse_questions(t, encoded, (tokens, masks))
            memory, memory_mask = fused.tokens, fused.mask
        else:
            memory = torch.cat([tokens[m] for m in self.context_modalities], dim=1)  # (B, sum Tm, H)
            memory_mask = torch.cat([masks[m] for m in self.context_modalities], dim=1)
        text = self.config.text
        return self.decoder.generate(
            memory, memory_mask, max_length=max_length, bos_id=text.bos_id, eos_id=text.eos_id, pad_id=text.pad_id,
            num_beams=num_beams, sync_group=self.dp_group,
        )  # fmt: skip


__all__ = ["CONTRASTIVE_HEADS", "ContextProjection", "ModelOutput", "MultiModalTransformer", "weight_init"]
