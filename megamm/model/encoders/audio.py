"""Audio encoder (AST-style): 16 kHz mono waveform -> log-mel spectrogram -> non-overlapping
patches over frequency x time -> transformer -> the class token's features.

Tokens are ordered time-major: token ``1 + t * F_p + f`` is the patch of time patch ``t`` and
frequency patch ``f`` (``F_p = n_mels / patch_frequency``; token 0 is the class token), so the
tokens of a shorter clip are a prefix of a longer one's and padded audio only appends tokens.
(AST's convolution orders them frequency-major; time-major keeps padding at the end.)

Padded audio: :class:`~megamm.model.encoders.melspec.LogMelSpectrogram` gives the frame mask (a
frame is real when computed from real audio, its padding frames are 0), the frames are zero-padded
to a multiple of ``patch_time``, and a patch is real when **any** of its frames is real (the last
time patch of a clip may be partly padding, its padded frames 0). The class token is always real.
Patches that are all padding are hidden from attention (the key padding mask), so the pooled
output of a clip does not depend on how much padding follows it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.blocks import BlockAttention, EncoderOutput, SequenceLayout, TransformerStack, hidden_dropout
from megamm.model.encoders.image import pool_class_token
from megamm.model.encoders.melspec import LogMelSpectrogram
from megamm.model.init import WeightInit
from megamm.parallel.mappings import ProcessGroup

PatchSize = Union[int, tuple[int, int]]


def _patch_sizes(patch_size: PatchSize) -> tuple[int, int]:
    """``patch_size`` as (frequency, time): an int is square."""
    sizes = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(sizes) != 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"patch_size={patch_size!r} must be a positive int or (frequency, time) pair of them")
    return sizes[0], sizes[1]


def patchify_spectrogram(spectrogram: torch.Tensor, patch_frequency: int, patch_time: int) -> torch.Tensor:
    """(B, M, T) with M a multiple of ``patch_frequency`` and T of ``patch_time`` ->
    (B, (T / pt) * (M / pf), pf * pt), time-major patches, each flattened frequency-major."""
    batch, mels, frames = spectrogram.shape
    x = spectrogram.reshape(batch, mels // patch_frequency, patch_frequency, frames // patch_time, patch_time)
    x = x.permute(0, 3, 1, 2, 4)  # (B, T/pt, M/pf, pf, pt)
    return x.reshape(batch, (frames // patch_time) * (mels // patch_frequency), patch_frequency * patch_time)


class AudioPatchEmbedding(nn.Module):
    """Linear patch embedding of a log-mel spectrogram + class token + learned positions, then
    ``dropout`` (in training). (B, n_mels, frames) -> (B, N + 1, H) with
    N = ceil(frames / patch_time) * (n_mels / patch_frequency), time-major (module docstring); under
    sequence parallelism (``sequence_parallel`` at tp > 1) this rank's slice (B, T' / tp, H) of the
    N + 1 tokens zero-padded to T', a multiple of tp, as the image embedding.

    ``patch_size`` is (frequency, time), or one int for both (AST: 16). Positions are learned for
    ``max_frames`` frames (rounded up to whole patches); longer spectrograms are an error. Its
    weights are drawn in the random stream of the piece ``"audio.embedding"``.
    """

    def __init__(
        self,
        n_mels: int,
        max_frames: int,
        patch_size: PatchSize,
        hidden_size: int,
        init: WeightInit,
        group: ProcessGroup = None,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_frequency, self.patch_time = _patch_sizes(patch_size)
        if n_mels % self.patch_frequency:
            raise ValueError(
                f"n_mels={n_mels} is not a multiple of the patch's frequency size {self.patch_frequency}: "
                "choose n_mels or patch_size so that it divides"
            )
        if max_frames < 1:
            raise ValueError(f"max_frames={max_frames} must be at least 1")
        self.n_mels = n_mels
        self.max_frames = max_frames
        self.frequency_patches = n_mels // self.patch_frequency
        self.max_time_patches = -(-max_frames // self.patch_time)
        self.layout = SequenceLayout(group, sequence_parallel)
        self.dropout = dropout
        patch_features = self.patch_frequency * self.patch_time
        with init.seeded("audio.embedding"):
            self.patch_embedding = nn.Linear(patch_features, hidden_size)
            init.linear(patch_features)(self.patch_embedding.weight)
            nn.init.zeros_(self.patch_embedding.bias)
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            self.position_embedding = nn.Parameter(
                torch.empty(1 + self.max_time_patches * self.frequency_patches, hidden_size)
            )
            init.position()(self.position_embedding)

    def num_tokens(self, frames: int) -> int:
        """Tokens of a spectrogram of ``frames`` frames, the class token included (before any
        sequence-parallel padding)."""
        return 1 + -(-frames // self.patch_time) * self.frequency_patches

    def _check(self, spectrogram: torch.Tensor) -> None:
        if spectrogram.dim() != 3 or spectrogram.shape[1] != self.n_mels:
            raise ValueError(
                f"spectrogram must be (batch, n_mels={self.n_mels}, frames); got shape {tuple(spectrogram.shape)}"
            )
        frames = spectrogram.shape[-1]
        if frames > self.max_frames:
            raise ValueError(
                f"the spectrogram has {frames} frames, more than max_frames={self.max_frames}: "
                "cut the audio shorter or build the encoder with a larger max_frames"
            )

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """spectrogram (B, n_mels, frames) -> (B, N + 1, H), or this rank's (B, T' / tp, H)."""
        self._check(spectrogram)
        frames = spectrogram.shape[-1]
        pad = -frames % self.patch_time
        x = spectrogram.to(self.patch_embedding.weight.dtype)
        if pad:
            x = F.pad(x, (0, pad))  # (B, M, T_p * pt): zero frames complete the last time patch
        patches = patchify_spectrogram(x, self.patch_frequency, self.patch_time)  # (B, N, pf * pt)
        x = self.patch_embedding(patches)  # (B, N, H)
        cls = self.class_token.expand(x.shape[0], -1, -1)  # (B, 1, H)
        x = torch.cat([cls, x], dim=1) + self.position_embedding[: x.shape[1] + 1]  # (B, N + 1, H)
        x = self.layout.scatter(x)  # (B, T' / tp, H) under sequence parallelism
        return hidden_dropout(x, self.dropout, self.training, self.layout)

    def patch_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """frame_mask (B, frames) bool (True = real frame) -> (B, N + 1) bool, True = real token:
        the class token, and every patch of which any frame is real."""
        pad = -frame_mask.shape[1] % self.patch_time
        frames = F.pad(frame_mask, (0, pad), value=False)  # (B, T_p * pt)
        real = frames.reshape(frames.shape[0], -1, self.patch_time).any(dim=-1)  # (B, T_p)
        real = real[:, :, None].expand(-1, -1, self.frequency_patches).reshape(real.shape[0], -1)  # (B, N)
        return torch.cat([real.new_ones(real.shape[0], 1), real], dim=1)  # (B, N + 1)

    def key_padding_mask(
        self, frames: int, frame_mask: Optional[torch.Tensor], device: torch.device
    ) -> Optional[torch.Tensor]:
        """The transformer's key mask over the whole (padded) sequence: (B, T') from ``frame_mask``
        (:meth:`patch_mask`, extended with False over the sequence-parallel padding), (1, T') when
        ``frame_mask`` is None and sequence parallelism pads, else None."""
        if frame_mask is None:
            return self.layout.padding_mask(self.num_tokens(frames), device)
        return self.layout.pad_mask(self.patch_mask(frame_mask.to(device)))


class AudioEncoder(nn.Module):
    """:class:`~megamm.model.encoders.melspec.LogMelSpectrogram` + :class:`AudioPatchEmbedding` +
    transformer (pieces ``"audio.block.{i}"``); pools the class token, as the image encoder.

    waveform (B, S) mono at ``sample_rate`` with optional ``lengths`` (B,) valid samples -> (B, H).
    The spectrogram's settings (``sample_rate``, ``n_fft``, ``hop_length``, ``mean``, ``std``, ...)
    are keyword arguments passed to it; ``max_frames`` bounds the spectrogram's frames, i.e. the
    audio to at most ``max_frames * hop_length - 1`` samples (:attr:`max_samples`). ``attention``:
    the blocks' kernels (:class:`~megamm.model.blocks.BlockAttention`, one for all or one per block).
    """

    def __init__(
        self,
        n_mels: int,
        max_frames: int,
        patch_size: PatchSize,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention: Union[BlockAttention, Sequence[BlockAttention], None] = None,
        **spectrogram: Any,
    ) -> None:
        super().__init__()
        self.spectrogram = LogMelSpectrogram(n_mels=n_mels, **spectrogram)  # type: ignore[arg-type]
        self.embedding = AudioPatchEmbedding(
            n_mels, max_frames, patch_size, hidden_size, init, group, sequence_parallel, dropout
        )
        self.transformer = TransformerStack(
            "audio", hidden_size, num_layers, num_heads, ffn_size, group, init, sequence_parallel, dropout,
            attention_dropout, attention,
        )  # fmt: skip

    @property
    def max_samples(self) -> int:
        """The longest waveform (padding included) the positions cover: ``max_frames * hop_length - 1``."""
        return self.embedding.max_frames * self.spectrogram.hop_length - 1

    def forward(
        self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None, sample_rate: Optional[int] = None
    ) -> torch.Tensor:
        """waveform (B, S) float, lengths (B,) valid samples (None: all ``S``), ``sample_rate`` of
        the audio if known (checked) -> (B, H)."""
        return self.features(waveform, lengths, sample_rate).pooled

    def features(
        self,
        waveform: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        sample_rate: Optional[int] = None,
        tokens: bool = False,
    ) -> EncoderOutput:
        """As :meth:`forward`: the class token's features (B, H) and, with ``tokens``, every
        token's (B, N + 1, H) with their mask (B, N + 1) (patches of padded audio are False)."""
        if waveform.dim() == 2 and waveform.shape[1] > self.max_samples:
            frames = self.spectrogram.num_frames(waveform.shape[1])
            raise ValueError(
                f"audio of {waveform.shape[1]} samples gives {frames} frames, more than max_frames="
                f"{self.embedding.max_frames} ({self.max_samples} samples at hop_length={self.spectrogram.hop_length}): "
                "cut the audio (and its padding) shorter or build the encoder with a larger max_frames"
            )
        spectrogram, frame_mask = self.spectrogram(waveform, lengths, sample_rate)  # (B, M, F), (B, F) or None
        x = self.embedding(spectrogram)  # (B, N + 1, H), or this rank's (B, T' / tp, H) under sequence parallelism
        mask = self.embedding.key_padding_mask(spectrogram.shape[-1], frame_mask, x.device)  # (B, T'), (1, T') or None
        x = self.transformer(x, mask)
        pooled = pool_class_token(x, self.embedding.layout)  # (B, H)
        if not tokens:
            return EncoderOutput(pooled)
        count = self.embedding.num_tokens(spectrogram.shape[-1])
        real = None if frame_mask is None else self.embedding.patch_mask(frame_mask.to(x.device))  # (B, N + 1)
        return EncoderOutput(pooled, self.embedding.layout.gather(x, count), real)
