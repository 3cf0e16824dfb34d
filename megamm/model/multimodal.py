"""MultiModalTransformer: image and text encoders, projections and the contrastive head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megamm.config import ModelConfig
from megamm.model.blocks import TransformerStack, tower_attention
from megamm.model.encoders import ImageEncoder, TextEncoder
from megamm.model.heads import ContrastiveHead, Projection
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState


def weight_init(config: ModelConfig, seed: Optional[int] = None) -> WeightInit:
    """The model's initialisation; ``seed=None`` draws the base seed from torch's global generator
    (so ``torch.manual_seed(s)`` before building fixes the model, as for any torch module)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # also when building on "meta"
    return WeightInit(config.init, config.init_std, config.token_embedding_std, seed)


class MultiModalTransformer(nn.Module):
    """CLIP-style dual encoder, tensor-parallel inside the encoders.

    Every weight is drawn from ``seed`` (:func:`weight_init`) as a full master tensor, so any
    tensor-parallel or pipeline-parallel layout of the same seed gives the same model.

    ``sequence_parallel`` (``parallel.sequence_parallel``): Megatron's sequence parallelism inside
    both encoders (see :mod:`megamm.model.blocks`); the same weights, and without dropout the same
    numbers. ``config.dropout`` and ``config.attention_dropout`` act in training mode only.
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
        text, image = config.text, config.image
        init = weight_init(config, seed)
        dropouts = {"dropout": config.dropout, "attention_dropout": config.attention_dropout}
        self.text_encoder = TextEncoder(
            vocab_size=text.vocab_size,
            max_length=text.max_length,
            hidden_size=text.hidden_size,
            num_layers=text.num_layers,
            num_heads=text.num_heads,
            ffn_size=text.ffn_size,
            group=parallel.tp_group,
            init=init,
            sequence_parallel=sequence_parallel,
            attention=tower_attention(text),
            learned_positions=text.positions == "learned",
            **dropouts,
        )
        self.image_encoder = ImageEncoder(
            image_size=image.image_size,
            patch_size=image.patch_size,
            channels=image.channels,
            hidden_size=image.hidden_size,
            num_layers=image.num_layers,
            num_heads=image.num_heads,
            ffn_size=image.ffn_size,
            group=parallel.tp_group,
            init=init,
            sequence_parallel=sequence_parallel,
            attention=tower_attention(image),
            **dropouts,
        )
        self.text_projection = Projection("text", text.hidden_size, config.embed_dim, init)
        self.image_projection = Projection("image", image.hidden_size, config.embed_dim, init)
        self.contrastive = ContrastiveHead(config.logit_scale_init, config.logit_scale_max, parallel.dp_group)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every transformer block in the backward pass instead of keeping its activations."""
        for module in self.modules():
            if isinstance(module, TransformerStack):
                module.activation_checkpointing = enabled

    def forward(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        compute_loss: bool = True,
    ) -> dict[str, torch.Tensor]:
        """image (B, C, S, S), text_ids (B, T), text_mask (B, T) bool.

        Returns ``image_emb`` and ``text_emb`` (B, E), L2-normalised, and ``loss`` (scalar)
        when ``compute_loss``. Every data-parallel rank must call it with the same B.
        """
        image_emb = self.image_projection(self.image_encoder(image))  # (B, E)
        text_emb = self.text_projection(self.text_encoder(text_ids, text_mask))  # (B, E)
        out = {"image_emb": image_emb, "text_emb": text_emb}
        if compute_loss:
            out["loss"] = self.contrastive(image_emb, text_emb)
        return out
