"""The multi-modal model as a sequence of pipeline layers (DeepSpeed ``LayerSpec``s).

The dual encoder becomes one flat sequence, cut into stages by DeepSpeed's ``PipelineModule``:

    0  ImageEmbeddingLayer      (images, ids, mask)        -> (image (B, N+1, Hi), ids, mask)
    1  TextEmbeddingLayer       (image, ids, mask)         -> (image, text (B, T, Ht), mask (B, T))
       BlockLayer("image") x Li (image, text, mask)       -> (block(image), text, mask)
       HeadLayer("image")       (image, text, mask)        -> (image_emb (B, E), text, mask)
       BlockLayer("text") x Lt  (image_emb, text, mask)   -> (image_emb, block(text), mask)
       HeadLayer("text")        (image_emb, text, mask)    -> (image_emb, text_emb (B, E))
       TemperatureLayer         (image_emb, text_emb)      -> (image_emb, text_emb, scale (1,))

and :class:`ContrastiveLoss` turns the last stage's output into the loss. Both modalities' streams
travel through every stage as one tuple of tensors (the image stream has become its pooled
embedding by the time the text blocks run). Each layer draws its weights in the random stream of
its piece (``"image.block.3"``, ...; :meth:`megamm.model.init.WeightInit.seeded`) with the same
modules as :class:`~megamm.model.MultiModalTransformer`, so a pipeline of any shape starts from
the very weights one process builds, and computes the same loss.

Under sequence parallelism (``sequence_parallel`` at tp > 1) the two streams travel as each
tensor-parallel rank's slice of the sequence, padded to a multiple of tp: image (B, T'i / tp, Hi),
text (B, T't / tp, Ht), and the text embedding pads the mask to (B, T't); every rank sends its own
slices to the same tensor-parallel rank of the next stage. The heads pool from the slices, as the
single-process model does. DeepSpeed's partitioning of activations between stages (its
``pipeline.pipe_partitioned``, ``grad_partitioned``) must be off: it splits the first tensor over the
tensor-parallel ranks and sends the parts, taking that tensor to be alike on every one of them.

No weights are shared between layers of this model, so every layer is a plain ``LayerSpec``;
a tied pair (a captioning decoder's output projection and its token embedding) would be a
``TiedLayerSpec`` with one key.

Parameter names differ between the two forms: DeepSpeed names a pipeline layer's parameters
after the layer's index (``"5.block.attn.qkv.weight"``; a ``TiedLayerSpec``'s after its key,
``"tied_modules.<key>.<name>"``), the plain model after its modules
(``"text_encoder.transformer.layers.0.attn.qkv.weight"``). Each layer class says what each of
its own submodules (or parameters) is called in the plain model (``PLAIN_NAMES``, filled in with
the layer's arguments), and :func:`plain_prefixes` lists them for every layer of a config.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megamm.config import ModelConfig, pipeline_split
from megamm.model.blocks import SequenceLayout, SequenceParallelLayerNorm, TransformerBlock, tower_attention
from megamm.model.encoders.image import ImagePatchEmbedding, pool_class_token
from megamm.model.encoders.text import TextEmbedding, masked_mean
from megamm.model.heads import CLAMP_ATTRIBUTE, Projection, contrastive_loss
from megamm.model.init import WeightInit
from megamm.model.multimodal import weight_init
from megamm.parallel import ParallelState, checkpoint
from megamm.parallel.mappings import ProcessGroup

Stream = tuple[torch.Tensor, ...]
MODALITIES = ("image", "text")


class ImageEmbeddingLayer(nn.Module):
    """(images, ids, mask) -> (image features, ids, mask)."""

    PLAIN_NAMES = {"embedding": "image_encoder.embedding"}

    def __init__(
        self, config: ModelConfig, init: WeightInit, group: ProcessGroup = None, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        image = config.image
        self.embedding = ImagePatchEmbedding(
            image.image_size, image.patch_size, image.channels, image.hidden_size, init, group, sequence_parallel,
            config.dropout,
        )  # fmt: skip

    def forward(self, inputs: Stream) -> Stream:
        images, ids, mask = inputs
        return self.embedding(images), ids, mask


class TextEmbeddingLayer(nn.Module):
    """(image features, ids, mask) -> (image features, text features, mask); under sequence
    parallelism the mask comes out padded like the text stream."""

    PLAIN_NAMES = {"embedding": "text_encoder.embedding"}

    def __init__(
        self, config: ModelConfig, group: ProcessGroup, init: WeightInit, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        text = config.text
        self.embedding = TextEmbedding(
            text.vocab_size, text.max_length, text.hidden_size, group, init, sequence_parallel, config.dropout,
            learned_positions=text.positions == "learned",
        )

    def forward(self, inputs: Stream) -> Stream:
        image, ids, mask = inputs
        return image, self.embedding(ids), self.embedding.layout.pad_mask(mask)


class BlockLayer(nn.Module):
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
    ) -> None:
        super().__init__()
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

    def forward(self, inputs: Stream) -> Stream:
        image, text, mask = inputs
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        if self.modality == "text":
            padding = mask  # (B, T'), padded by the text embedding under sequence parallelism
        else:  # the padding that sequence parallelism added, as ImagePatchEmbedding.key_padding_mask
            padding = self.block.layout.padding_mask(self.image_tokens, image.device)
        x = image if self.modality == "image" else text
        x = checkpoint(self.block, x, padding) if recompute else self.block(x, padding)
        return (x, text, mask) if self.modality == "image" else (image, x, mask)


class HeadLayer(nn.Module):
    """One tower's final LayerNorm, pooling (class token / masked mean) and projection."""

    PLAIN_NAMES = {"final_norm": "{modality}_encoder.transformer.final_norm", "projection": "{modality}_projection"}

    def __init__(
        self,
        config: ModelConfig,
        modality: str,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        hidden = getattr(config, modality).hidden_size
        self.modality = modality
        self.layout = SequenceLayout(group, sequence_parallel)
        self.final_norm = SequenceParallelLayerNorm(hidden, group, sequence_parallel)
        self.projection = Projection(modality, hidden, config.embed_dim, init)

    def forward(self, inputs: Stream) -> Stream:
        if self.modality == "image":
            image, text, mask = inputs
            pooled = pool_class_token(self.final_norm(image), self.layout)  # (B, Hi)
            return self.projection(pooled), text, mask  # (B, E), ...
        image_emb, text, mask = inputs
        pooled = masked_mean(self.final_norm(text), mask, self.layout)  # (B, Ht)
        return image_emb, self.projection(pooled)  # (B, E), (B, E)


class TemperatureLayer(nn.Module):
    """The learnable logit scale: (image_emb, text_emb) -> (image_emb, text_emb, exp(scale) (1,)).

    Clamped like :class:`~megamm.model.heads.ContrastiveHead`'s (``CLAMP_ATTRIBUTE``).
    """

    PLAIN_NAMES = {"logit_scale": "contrastive.logit_scale"}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        setattr(self.logit_scale, CLAMP_ATTRIBUTE, (None, config.logit_scale_max))
        self.logit_scale_max = config.logit_scale_max

    def forward(self, inputs: Stream) -> Stream:
        image_emb, text_emb = inputs
        return image_emb, text_emb, self.logit_scale.clamp(max=self.logit_scale_max).exp()


class ContrastiveLoss:
    """The pipeline's loss function: symmetric InfoNCE over the data-parallel group's batch."""

    def __init__(self, dp_group: ProcessGroup) -> None:
        self.dp_group = dp_group

    def __call__(self, outputs: Stream, labels: Any) -> torch.Tensor:
        image_emb, text_emb, scale = outputs
        return contrastive_loss(image_emb, text_emb, scale, self.dp_group)


def layer_specs(
    config: ModelConfig, parallel: ParallelState, init: WeightInit, sequence_parallel: bool = False
) -> list[LayerSpec]:
    """The model's layers, in pipeline order (see the module docstring)."""
    group, sp = parallel.tp_group, sequence_parallel
    specs = [
        LayerSpec(ImageEmbeddingLayer, config, init, group, sp),
        LayerSpec(TextEmbeddingLayer, config, group, init, sp),
    ]
    for modality in MODALITIES:
        tower = getattr(config, modality)
        specs += [LayerSpec(BlockLayer, config, modality, i, group, init, sp) for i in range(tower.num_layers)]
        specs.append(LayerSpec(HeadLayer, config, modality, init, group, sp))
    specs.append(LayerSpec(TemperatureLayer, config))
    return specs


def plain_prefixes(config: ModelConfig) -> list[tuple[str, str]]:
    """``(pipeline-form prefix, plain-form prefix)`` of every layer's submodules (or parameters),
    in layer order.

    Derived from :func:`layer_specs`: layer ``i``'s submodule ``block`` is ``"i.block"`` in the
    pipeline form (``"tied_modules.<key>.block"`` for a ``TiedLayerSpec``, listed once per key)
    and its class's ``PLAIN_NAMES["block"]``, filled in with the layer's arguments
    (``modality``, ``index``), in the plain one. A parameter's name in either form is its
    submodule's prefix followed by the same rest (``".attn.qkv.weight"``).

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
    the module docstring.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelState,
        partition: str = "parameters",
        seed: Optional[int] = None,
        sequence_parallel: bool = False,
    ) -> None:
        specs = layer_specs(config, parallel, weight_init(config, seed), sequence_parallel)
        assert len(specs) == config.num_pipeline_layers
        self._split = pipeline_split(partition, len(specs), parallel.pp_size)
        topology = PipeModelDataParallelTopology(num_pp=parallel.pp_size, num_mp=parallel.tp_size, num_dp=parallel.dp_size)
        super().__init__(
            layers=specs,
            topology=topology,
            loss_fn=ContrastiveLoss(parallel.dp_group),
            partition_method="uniform" if self._split is not None else partition,
            dynamic_shape=True,  # evaluation batches may be smaller than training micro-batches
        )

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
        """Recompute every transformer block of this stage in the backward pass."""
        for module in self.modules():
            if isinstance(module, BlockLayer):
                module.activation_checkpointing = enabled


__all__ = [
    "BlockLayer",
    "ContrastiveLoss",
    "HeadLayer",
    "ImageEmbeddingLayer",
    "MultiModalPipeline",
    "TemperatureLayer",
    "TextEmbeddingLayer",
    "layer_specs",
    "plain_prefixes",
]
