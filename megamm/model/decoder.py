"""Causal text decoder that cross-attends to fused features: captioning and generated answers.

:class:`TextDecoder` embeds tokens with a vocabulary-parallel table (learned positions or rotary),
runs pre-norm :class:`DecoderBlock` s (causal self-attention, cross-attention to a context, MLP)
and scores the next token with an LM head TIED to the token embedding: each tensor-parallel rank
multiplies the (replicated) hidden states by its own rows of the table, so the logits are
vocabulary-parallel, (B, T, V / tp), and the full (B, T, V) logits never exist on one rank during
training; :func:`~megamm.parallel.vocab_parallel_cross_entropy` takes them as they are.

:meth:`TextDecoder.generate` decodes greedily (``num_beams=1``) or by beam search, batched, with a
key/value cache (the context's keys and values computed once, each step attending with one
query). At tp > 1 each step all-gathers the last position's logits (B x V numbers: small) and the
tensor-parallel group's first rank broadcasts its choice, so every rank holds the same tokens and
runs the same collectives.

Random streams: the embedding draws its weights in the piece ``"{name}.embedding"``, block ``i``
in ``"{name}.block.{i}"`` (:meth:`~megamm.model.init.WeightInit.seeded`), so a model built at any
tensor-parallel size is the tp = 1 model split up.

No sequence parallelism: cross-attention needs every query position on each rank.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamm.model.attention import ParallelSelfAttention
from megamm.model.blocks import (
    ParallelMLP,
    SequenceLayout,
    SequenceParallelLayerNorm,
    hidden_dropout,
    residual_cross_attention,
)
from megamm.model.init import WeightInit
from megamm.parallel import (
    VocabParallelEmbedding,
    copy_to_group,
    gather_from_group,
    group_size,
    vocab_parallel_cross_entropy,
)
from megamm.parallel.mappings import ProcessGroup

POSITIONS = ("learned", "rotary")
"""How the decoder knows where a token is: learned position embeddings, or rotary queries and keys."""

IGNORE_INDEX = -100
"""Target of a position that counts for nothing in :meth:`TextDecoder.loss`."""

LayerCache = dict[str, torch.Tensor]
"""One block's cached keys and values: ``self_k``, ``self_v`` (B, h, t, d), the tokens so far;
``cross_k``, ``cross_v`` (B, h, Tk, d), the context's."""


class DecoderBlock(nn.Module):
    """Pre-norm decoder block, (B, T, H) -> (B, T, H):
    ``x + attn(ln(x))`` (causal self-attention), ``x + cross(ln(x), context)``, ``x + mlp(ln(x))``,
    each branch's output dropped with ``dropout`` in training.

    The context is (B, Tk, ``context_size``) with a key padding mask (B, Tk) or (1, Tk)
    (True = real); its keys and values are projected by a column-parallel layer that reads
    ``context_size`` features (fan-in initialised from it).
    """

    def __init__(
        self,
        hidden_size: int,
        context_size: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        num_layers: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rotary: bool = False,
    ) -> None:
        super().__init__()
        self.layout = SequenceLayout(group, False)
        self.dropout = dropout
        self.self_norm = SequenceParallelLayerNorm(hidden_size)
        self.self_attn = ParallelSelfAttention(
            hidden_size,
            num_heads,
            group,
            init_method=init.linear(hidden_size),
            output_init_method=init.residual(hidden_size, num_layers),
            attention_dropout=attention_dropout,
            causal=True,
            rotary=rotary,
        )
        self.cross_norm = SequenceParallelLayerNorm(hidden_size)
        self.cross_attn = residual_cross_attention(
            hidden_size, context_size, num_heads, group, init, num_layers, attention_dropout
        )
        self.mlp_norm = SequenceParallelLayerNorm(hidden_size)
        self.mlp = ParallelMLP(hidden_size, ffn_size, group, init, num_layers)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + hidden_dropout(branch, self.dropout, self.training, self.layout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x (B, T, H), context (B, Tk, Hc), context_mask (B, Tk) or (1, Tk) bool -> (B, T, H)."""
        x = self._residual(x, self.self_attn(self.self_norm(x)))  # causal: no key mask needed (right padding)
        x = self._residual(x, self.cross_attn(self.cross_norm(x), context, context_mask))
        return self._residual(x, self.mlp(self.mlp_norm(x)))

    # -- incremental decoding ------------------------------------------------------------------

    def start_cache(self, context: torch.Tensor) -> LayerCache:
        """The cache before the first token: the context's keys and values (B, h, Tk, d), computed once."""
        attn = self.cross_attn
        batch, keys, _ = context.shape
        kv = attn.kv(context).view(batch, keys, 2, attn.local_heads, attn.head_dim)  # (B, Tk, 2, h, d)
        cross_k, cross_v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, Tk, d)
        empty = cross_k.new_empty(batch, attn.local_heads, 0, attn.head_dim)  # (B, h, 0, d)
        return {"self_k": empty, "self_v": empty, "cross_k": cross_k, "cross_v": cross_v}

    def step(
        self, x: torch.Tensor, cache: LayerCache, position: int, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One new token per row: x (B, 1, H) at ``position`` -> (B, 1, H), appending its key and value
        to ``cache`` (in place). Equal to :meth:`forward`'s row ``position`` on the whole prefix
        (inference only: no dropout)."""
        attn = self.self_attn
        batch = x.shape[0]
        qkv = attn.qkv(self.self_norm(x)).view(batch, 1, 3, attn.local_heads, attn.head_dim)  # (B, 1, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, 1, d)
        if attn.rotary is not None:
            cos, sin = attn.rotary.angles(torch.tensor([position], device=x.device))  # (1, r)
            q, k = attn.rotary.rotate(q, cos, sin), attn.rotary.rotate(k, cos, sin)
        cache["self_k"] = torch.cat([cache["self_k"], k], dim=2)  # (B, h, t + 1, d)
        cache["self_v"] = torch.cat([cache["self_v"], v], dim=2)
        attended = attn.kernel(q, cache["self_k"], cache["self_v"])  # (B, h, 1, d): every cached key is in the past
        x = x + attn.out(attended.transpose(1, 2).reshape(batch, 1, -1))

        cross = self.cross_attn
        q = cross.q(self.cross_norm(x)).view(batch, 1, cross.local_heads, cross.head_dim)  # (B, 1, h, d)
        q = q.transpose(1, 2)  # (B, h, 1, d)
        attended = cross.kernel(q, cache["cross_k"], cache["cross_v"], context_mask)  # (B, h, 1, d)
        x = x + cross.out(attended.transpose(1, 2).reshape(batch, 1, -1))
        return x + self.mlp(self.mlp_norm(x))  # (B, 1, H)


def _reorder_cache(caches: list[LayerCache], rows: torch.Tensor) -> list[LayerCache]:
    """Every cached tensor's rows (dimension 0) picked by ``rows`` (a beam's parents)."""
    return [{key: value.index_select(0, rows) for key, value in cache.items()} for cache in caches]


def _score_dtype(context: torch.Tensor) -> torch.dtype:
    """The dtype of generation's log-probabilities: the context's, at least float32."""
    return torch.promote_types(context.dtype, torch.float32)


def _everywhere(flag: torch.Tensor, group: ProcessGroup) -> bool:
    """True when ``flag`` (a bool scalar) holds on every rank of ``group`` (collective at size > 1)."""
    if group_size(group) <= 1:
        return bool(flag)
    value = flag.to(torch.int64).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def _broadcast_from_first(tensors: list[torch.Tensor], group: ProcessGroup) -> None:
    """In place: every rank of ``group`` takes the group's first rank's ``tensors`` (a decoding
    choice), so that the ranks never disagree on a token, even by a rounding tie."""
    if group_size(group) == 1:
        return
    source = dist.get_global_rank(group, 0)
    for tensor in tensors:
        dist.broadcast(tensor, src=source, group=group)


class TextDecoder(nn.Module):
    """Causal transformer over tokens, cross-attending to a context (fused image / question features).

    ids (B, T) -> vocabulary-parallel logits (B, T, V / tp), next-token scores at each position; the
    LM head is the token embedding's table (tied), its logits scaled by 1 / sqrt(H) (as T5 scales
    a tied head: normalised hidden states against unit-variance embeddings, the default
    ``token_embedding_std``, start with unit-variance logits). See the module docstring for the layout.

    Args:
        vocab_size: V, divisible by the tensor-parallel size.
        max_length: longest token sequence (BOS included) the decoder reads or generates.
        hidden_size, num_layers, num_heads, ffn_size: the transformer's sizes (num_heads divisible
            by the tensor-parallel size).
        context_size: Hc, the width of the context's features.
        group: the tensor-parallel group (None: one process).
        init: weight initialisation; pieces ``"{name}.embedding"`` and ``"{name}.block.{i}"``.
        positions: ``"learned"`` (position embeddings added to the tokens) or ``"rotary"``.
        dropout: embedding and residual-branch dropout; attention_dropout: attention probabilities'.
        label_smoothing: :meth:`loss`'s default label smoothing.
        name: prefix of the pieces' random streams.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        context_size: int,
        group: ProcessGroup,
        init: WeightInit,
        positions: str = "learned",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        name: str = "decoder",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"TextDecoder: positions={positions!r} is not one of {', '.join(POSITIONS)}")
        if vocab_size < 2:
            raise ValueError(f"TextDecoder: vocab_size={vocab_size} must be at least 2 (a token and EOS)")
        if max_length < 2:
            raise ValueError(f"TextDecoder: max_length={max_length} must be at least 2 (BOS and one token)")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"TextDecoder: label_smoothing={label_smoothing} must be in [0, 1]")
        self.group = group
        self.vocab_size = vocab_size
        self.context_size = context_size
        self.max_length = max_length
        self.positions = positions
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.layout = SequenceLayout(group, False)
        self.logit_scale = hidden_size**-0.5
        with init.seeded(f"{name}.embedding"):
            self.token_embedding = VocabParallelEmbedding(
                vocab_size, hidden_size, group, init_method=init.token_embedding()
            )
            if positions == "learned":
                self.position_embedding: Optional[nn.Parameter] = nn.Parameter(torch.empty(max_length, hidden_size))
                init.position()(self.position_embedding)
            else:
                self.register_parameter("position_embedding", None)
        blocks = []
        for index in range(num_layers):
            with init.seeded(f"{name}.block.{index}"):
                blocks.append(
                    DecoderBlock(
                        hidden_size, context_size, num_heads, ffn_size, group, init, num_layers,
                        dropout, attention_dropout, rotary=positions == "rotary",
                    )  # fmt: skip
                )
        self.layers = nn.ModuleList(blocks)
        self.final_norm = SequenceParallelLayerNorm(hidden_size)

    # -- training --------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """ids (B, T) at positions offset .. offset + T - 1 -> (B, T, H), dropped out in training."""
        if offset + ids.shape[1] > self.max_length:
            raise ValueError(
                f"TextDecoder: {offset + ids.shape[1]} tokens exceed max_length={self.max_length}; "
                "truncate the text or build the decoder with a larger max_length"
            )
        x = self.token_embedding(ids)  # (B, T, H)
        if self.position_embedding is not None:
            x = x + self.position_embedding[offset : offset + ids.shape[1]].unsqueeze(0)
        return hidden_dropout(x, self.dropout, self.training, self.layout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: hidden (..., H), alike on every rank -> this rank's vocabulary slice of the
        logits (..., V / tp), ``hidden @ E_shard^T / sqrt(H)``; the hidden states' gradient is
        summed over the group."""
        hidden = copy_to_group(hidden * self.logit_scale, self.group)  # (..., H)
        return F.linear(hidden, self.token_embedding.weight)  # (..., V / tp)

    def hidden_states(
        self, ids: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """ids (B, T), context (B, Tk, Hc), context_mask (B, Tk) or (1, Tk) bool -> final-norm
        hidden states (B, T, H)."""
        if ids.dim() != 2:
            raise ValueError(f"TextDecoder: ids must be (B, T), got {tuple(ids.shape)}")
        if context.dim() != 3 or context.shape[0] != ids.shape[0] or context.shape[2] != self.context_size:
            raise ValueError(
                f"TextDecoder: context must be (B, Tk, Hc) with the ids' B={ids.shape[0]} and "
                f"Hc = context_size={self.context_size}, got {tuple(context.shape)}"
            )
        x = self.embed(ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, context, context_mask)
        return self.final_norm(x)  # (B, T, H)

    def forward(
        self,
        ids: torch.Tensor,
        context: Optional[torch.Tensor],
        context_mask: Optional[torch.Tensor] = None,
        *,
        caches: Optional[list[LayerCache]] = None,
        position: int = 0,
    ) -> torch.Tensor:
        """ids (B, T), context (B, Tk, Hc), context_mask (B, Tk) or (1, Tk) bool (True = real) ->
        vocabulary-parallel next-token logits (B, T, V / tp). Position t sees tokens 0 .. t only.

        With ``caches`` (one incremental decoding step, :meth:`generate`): ids (N, 1), the newest
        token at ``position``, appended to the caches (whose context keys and values are already
        there; ``context`` is not read) -> log-probabilities of the next token over the whole
        vocabulary (N, V). A step runs as the module's forward pass so that ZeRO-3 gathers the
        decoder's own parameters (the position and tied token embeddings) for it."""
        if caches is not None:
            return self._cached_step(ids[:, 0], caches, position, context_mask)
        return self.logits(self.hidden_states(ids, context, context_mask))

    def loss(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor] = None,
        label_smoothing: Optional[float] = None,
    ) -> torch.Tensor:
        """Teacher-forced next-token cross entropy, averaged over the predicted real tokens.

        ids (B, T) right-padded (BOS ... EOS, then padding), mask (B, T) bool (True = real token):
        position t predicts token t + 1 wherever that token is real. ``label_smoothing`` defaults
        to the decoder's. A batch without a token to predict (every mask shorter than 2) gives a
        zero loss that still has a graph. Alike on every tensor-parallel rank.
        """
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"TextDecoder.loss: mask must be bool and shaped like ids {tuple(ids.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}: pass mask.bool()"
            )
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        logits = self(ids[:, :-1], context, context_mask)  # (B, T - 1, V / tp)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)  # (B, T - 1)
        total = vocab_parallel_cross_entropy(
            logits, target, group=self.group, ignore_index=IGNORE_INDEX, label_smoothing=smoothing, reduction="sum"
        )
        return total / (target != IGNORE_INDEX).sum().clamp_min(1)

    # -- generation ------------------------------------------------------------------------------

    def _start(self, context: torch.Tensor) -> list[LayerCache]:
        return [layer.start_cache(context) for layer in self.layers]

    def _step(
        self, tokens: torch.Tensor, caches: list[LayerCache], position: int, context_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """tokens (N,) at ``position`` -> log-probabilities of the next token over the whole
        vocabulary (N, V), float32 (at least), alike on every rank."""
        return self(tokens[:, None], None, context_mask, caches=caches, position=position)

    def _cached_step(
        self, tokens: torch.Tensor, caches: list[LayerCache], position: int, context_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        x = self.embed(tokens[:, None], offset=position)  # (N, 1, H)
        for layer, cache in zip(self.layers, caches):
            x = layer.step(x, cache, position, context_mask)
        logits = gather_from_group(self.logits(self.final_norm(x[:, 0])), self.group)  # (N, V): small
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    def _full_step(
        self, prefix: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """As :meth:`_step`, recomputing the whole prefix (N, t) (no cache)."""
        logits = gather_from_group(self(prefix, context, context_mask)[:, -1], self.group)  # (N, V)
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    @torch.no_grad()
    def generate(
        self,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor] = None,
        max_length: Optional[int] = None,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        return_scores: bool = False,
        sync_group: ProcessGroup = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Decode a token sequence for each context row.

        Returns ids (B, L): BOS, the generated tokens, EOS if one was generated within
        ``max_length`` tokens (BOS included; default the decoder's), then ``pad_id``; L is the
        longest row's length. With ``return_scores`` also (B,) float scores: the sum of the
        generated tokens' log-probabilities (EOS included) divided by ``n ** length_penalty``,
        n the number of generated tokens (EOS included, BOS not). ``bos_id``, ``eos_id``, ``pad_id``:
        the tokenizer's (``megamm.data.tokenizer``: BOS_ID, EOS_ID, PAD_ID = 0).

        ``num_beams=1``: greedy (the most likely token at each step; a row stops at EOS). Beam
        search (``num_beams`` = K > 1) keeps the K most likely unfinished prefixes (by summed
        log-probability); at each step, of the 2K best extensions, those ending in EOS among the
        first K become finished hypotheses, the best K others go on; a row stops once it has K
        finished hypotheses (at ``max_length`` its running beams finish too) and returns its best
        finished hypothesis by the length-normalised score above. With K = 1 this is greedy.

        At tp > 1 every rank must pass the same context; each step gathers the logits and the
        group's first rank's choice is broadcast, so all ranks return the same ids. The model is
        used as it is (call ``eval()`` first to switch dropout off). ``use_cache=False``
        recomputes the whole prefix at each step (same result, for checking the cache).
        ``sync_group``: ranks that must take the same number of steps whatever their contexts (the
        data-parallel group under ZeRO-3, whose parameter gathers are collectives): decoding stops
        when every row of every one of them has stopped.
        """
        max_length = self.max_length if max_length is None else max_length
        if not 2 <= max_length <= self.max_length:
            raise ValueError(
                f"TextDecoder.generate: max_length={max_length} must be in [2, {self.max_length}] "
                "(BOS and at least one token, within the decoder's max_length)"
            )
        if num_beams < 1:
            raise ValueError(f"TextDecoder.generate: num_beams={num_beams} must be >= 1")
        for what, token in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"TextDecoder.generate: {what}={token} is outside the vocabulary [0, {self.vocab_size})"
                )
        if context.dim() != 3 or context.shape[2] != self.context_size:
            raise ValueError(
                f"TextDecoder.generate: context must be (B, Tk, Hc) with Hc = context_size={self.context_size}, "
                f"got {tuple(context.shape)}"
            )
        if num_beams == 1:
            ids, scores = self._greedy(
                context, context_mask, max_length, bos_id, eos_id, pad_id, length_penalty, use_cache, sync_group
            )
        else:
            ids, scores = self._beam_search(
                context, context_mask, max_length, bos_id, eos_id, pad_id, num_beams, length_penalty, use_cache,
                sync_group,
            )
        return (ids, scores) if return_scores else ids

    def _next_log_probs(
        self,
        prefix: torch.Tensor,
        caches: Optional[list[LayerCache]],
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Log-probabilities (N, V) of the token after ``prefix`` (N, t): from the cache, which then
        holds the prefix, or recomputed."""
        if caches is None:
            return self._full_step(prefix, context, context_mask)
        return self._step(prefix[:, -1], caches, prefix.shape[1] - 1, context_mask)

    def _greedy(
        self,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor],
        max_length: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        length_penalty: float,
        use_cache: bool,
        sync_group: ProcessGroup = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, device = context.shape[0], context.device
        ids = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        total = torch.zeros(batch, dtype=_score_dtype(context), device=device)  # summed log-probabilities
        lengths = torch.zeros(batch, dtype=torch.long, device=device)  # generated tokens, EOS included
        caches = self._start(context) if use_cache else None
        for _ in range(max_length - 1):
            log_probs = self._next_log_probs(ids, caches, context, context_mask)  # (B, V)
            best, token = log_probs.max(dim=-1)  # (B,)
            _broadcast_from_first([best, token], self.group)
            token = token.masked_fill(finished, pad_id)
            total = total + best.masked_fill(finished, 0.0)
            lengths = lengths + (~finished).long()
            ids = torch.cat([ids, token[:, None]], dim=1)  # (B, t + 1)
            finished = finished | (token == eos_id)
            if _everywhere(finished.all(), sync_group):
                break
        return ids, total / lengths.clamp_min(1).to(total.dtype) ** length_penalty

    def _beam_search(
        self,
        context: torch.Tensor,
        context_mask: Optional[torch.Tensor],
        max_length: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        beams: int,
        length_penalty: float,
        use_cache: bool,
        sync_group: ProcessGroup = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, device = context.shape[0], context.device
        vocab = self.vocab_size
        steps = max_length - 1
        context = context.repeat_interleave(beams, dim=0)  # (B K, Tk, Hc)
        if context_mask is not None and context_mask.shape[0] != 1:
            context_mask = context_mask.repeat_interleave(beams, dim=0)  # (B K, Tk)
        caches = self._start(context) if use_cache else None
        ids = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=device)  # (B K, 1)
        dtype = _score_dtype(context)
        running = torch.full((batch, beams), float("-inf"), dtype=dtype, device=device)  # (B, K) summed log-probs
        running[:, 0] = 0.0  # one live beam at first: the others would repeat it
        best_score = torch.full((batch,), float("-inf"), dtype=dtype, device=device)  # (B,) length-normalised
        best_ids = torch.full((batch, max_length), pad_id, dtype=torch.long, device=device)  # (B, L)
        best_length = torch.ones(batch, dtype=torch.long, device=device)  # tokens, BOS included
        finished = torch.zeros(batch, dtype=torch.long, device=device)  # finished hypotheses per row
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        base = torch.arange(batch, device=device)[:, None] * beams  # (B, 1): each row's first beam
        rank = torch.arange(2 * beams, device=device)[None, :]  # (1, 2K)

        def keep_best(candidates: torch.Tensor, scores: torch.Tensor, accept: torch.Tensor, length: int) -> None:
            """Update each row's best finished hypothesis from ``candidates`` (B, C, length) with
            normalised ``scores`` (B, C), where ``accept`` (B, C)."""
            scores = scores.masked_fill(~accept, float("-inf"))
            top, which = scores.max(dim=1)  # (B,)
            better = top > best_score
            picked = candidates[torch.arange(batch, device=device), which]  # (B, length)
            best_score.copy_(torch.where(better, top, best_score))
            best_ids[:, :length] = torch.where(better[:, None], picked, best_ids[:, :length])
            best_ids[:, length:] = torch.where(better[:, None], pad_id, best_ids[:, length:])
            best_length.copy_(torch.where(better, length, best_length))

        for step in range(1, steps + 1):
            log_probs = self._next_log_probs(ids, caches, context, context_mask)  # (B K, V)
            candidates = (running[:, :, None] + log_probs.view(batch, beams, vocab)).view(batch, beams * vocab)
            top_scores, top_index = candidates.topk(2 * beams, dim=1)  # (B, 2K), best first
            _broadcast_from_first([top_scores, top_index], self.group)
            parent = top_index // vocab  # (B, 2K) beam within the row
            token = top_index % vocab  # (B, 2K)
            prefixes = ids.view(batch, beams, step).gather(1, parent[:, :, None].expand(-1, -1, step))  # (B, 2K, step)
            extended = torch.cat([prefixes, token[:, :, None]], dim=2)  # (B, 2K, step + 1)
            # finished: EOS among the K best extensions of a row still searching
            is_eos = (token == eos_id) & torch.isfinite(top_scores)
            accept = is_eos & (rank < beams) & ~done[:, None]
            keep_best(extended, top_scores / float(step) ** length_penalty, accept, step + 1)
            finished = finished + accept.sum(dim=1)
            # the K best extensions that did not end go on (at most K of the 2K end: one EOS per beam)
            order = (rank + is_eos.long() * 2 * beams).argsort(dim=1)[:, :beams]  # (B, K) non-EOS first, by rank
            running = top_scores.gather(1, order)  # (B, K)
            chosen = extended.gather(1, order[:, :, None].expand(-1, -1, step + 1))  # (B, K, step + 1)
            if step == steps:  # out of length: the running beams finish without EOS
                keep_best(chosen, running / float(step) ** length_penalty, ~done[:, None].expand(-1, beams), step + 1)
                break
            done = done | (finished >= beams)
            if _everywhere(done.all(), sync_group):
                break
            ids = chosen.view(batch * beams, step + 1)
            if caches is not None:
                caches = _reorder_cache(caches, (base + parent.gather(1, order)).view(-1))
        ids = best_ids[:, : int(best_length.max())]
        return ids, best_score
