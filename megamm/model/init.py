"""Weight initialisation: which standard deviation each kind of weight is drawn with.

Two schemes, chosen by ``model.init``:

- ``fan_in`` (the default): every matrix is drawn from N(0, 1 / fan_in), so a layer keeps the
  scale of its input whatever the width; residual-branch outputs (attention output, MLP down
  projection) are further scaled by 1 / sqrt(2 * num_layers), as in GPT-2 and OpenCLIP.
- ``fixed``: every matrix from N(0, ``model.init_std``^2) (GPT-2 and Megatron's 0.02). That
  constant suits widths near 1/0.02^2 = 2,500; a narrow model starts with near-uniform
  attention and learns several times slower (docs/ablations/init).

Token embeddings are drawn with ``model.token_embedding_std`` in both schemes (default 1.0, like
``nn.Embedding``), so that token identity dominates the learned positions at the start of
training; at 0.02, as large as the positions, mean-pooled captions start nearly identical.

Position embeddings use ``model.init_std`` in both schemes; class tokens start at zero.

Fan-in is always that of the full (unsharded) weight: tensor-parallel layers draw their full
master weight and slice it, so any tensor-parallel size gives the same model.

Each piece of the model (an embedding, one transformer block, a projection) draws its weights
from its own random stream, seeded by ``(seed, name of the piece)`` (:meth:`WeightInit.seeded`).
A piece's weights therefore do not depend on which other pieces were built before it: a
pipeline stage that builds only its own layers gets the same weights as one process building
the whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from megamm.config import INIT_SCHEMES
from megamm.parallel import normal_init
from megamm.parallel.layers import InitMethod


@dataclass(frozen=True)
class WeightInit:
    """The standard deviations of one model's weights (see the module docstring)."""

    scheme: str = "fan_in"
    std: float = 0.02
    """The fixed scheme's std; position embeddings' std in both schemes."""
    token_embedding_std: float = 1.0
    """Token embeddings' std (both schemes)."""
    seed: int = 0
    """Base seed of every piece's random stream (see :meth:`seeded`)."""

    def __post_init__(self) -> None:
        if self.scheme not in INIT_SCHEMES:
            raise ValueError(f"init scheme {self.scheme!r} is not one of {', '.join(INIT_SCHEMES)}")

    @contextlib.contextmanager
    def seeded(self, piece: str) -> Iterator[None]:
        """Draw the weights of ``piece`` (e.g. ``"text.block.3"``) from its own CPU random stream.

        The stream is seeded by a hash of ``(seed, piece)``; the global random state is restored
        afterwards, so building a piece neither depends on nor disturbs what came before.
        """
        digest = hashlib.sha256(f"{self.seed}:{piece}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            yield

    def linear_std(self, fan_in: int) -> float:
        """Std of a matrix that reads ``fan_in`` features."""
        return 1.0 / math.sqrt(fan_in) if self.scheme == "fan_in" else self.std

    def residual_std(self, fan_in: int, num_layers: int) -> float:
        """Std of a residual-branch output projection in a stack of ``num_layers`` blocks."""
        return self.linear_std(fan_in) / math.sqrt(2.0 * num_layers)

    def linear(self, fan_in: int) -> InitMethod:
        return normal_init(self.linear_std(fan_in))

    def residual(self, fan_in: int, num_layers: int) -> InitMethod:
        return normal_init(self.residual_std(fan_in, num_layers))

    def token_embedding(self) -> InitMethod:
        return normal_init(self.token_embedding_std)

    def position(self) -> InitMethod:
        return normal_init(self.std)
