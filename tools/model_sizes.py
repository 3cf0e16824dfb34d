"""Parameters and FLOPs per sample of the model recipes, as a Markdown table.

Everything is computed from the configs by :mod:`megamm.flops` (``count_parameters``,
``model_flops_per_sample``); no model is built, so the 1B recipe costs nothing to count.

    python tools/model_sizes.py                                   # the table, on stdout
    python tools/model_sizes.py --output docs/model_sizes.md      # the table in a page

Columns: parameters by component (text, image and audio encoders, fusion, decoder, and "other":
the projections into the embedding space, the temperatures, the context projections and the
ITM / VQA heads), their total, and the matmul FLOPs of one sample's forward pass and of a
training step (forward + backward) in GFLOP. The contrastive logits depend on the global
batch; by default each recipe's ``micro_batch_size`` on one rank (``--global-batch`` to change).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.config import load_config  # noqa: E402
from megamm.flops import count_parameters, model_flops_per_sample  # noqa: E402

RECIPES = ("tiny", "clip_tiny", "base", "large")
"""The recipes the table shows by default."""

COLUMNS = {
    "text": ("text_encoder",),
    "image": ("image_encoder",),
    "audio": ("audio_encoder",),
    "fusion": ("fusion",),
    "decoder": ("decoder",),
}
"""Table column -> the ``count_parameters`` components it sums; every other component is "other"."""

COMMAND = "python tools/model_sizes.py --output docs/model_sizes.md"
"""The command that writes docs/model_sizes.md."""


@dataclass
class RecipeSize:
    """One row of the table."""

    recipe: str
    parameters: dict[str, int]
    """By column (text, image, audio, fusion, decoder, other), 0 where the recipe has none."""
    total: int
    forward_flops: int
    training_flops: int
    global_batch: int
    flops_breakdown: dict[str, int]
    """Forward FLOPs per sample by component (``FlopCount.breakdown``)."""


def recipe_size(recipe: str, global_batch: Optional[int] = None) -> RecipeSize:
    """Parameters and FLOPs per sample of ``recipe`` (a name or a YAML path), computed from its
    config; ``global_batch`` defaults to the recipe's ``micro_batch_size`` (one rank)."""
    config = load_config(recipe)
    batch = config.micro_batch_size if global_batch is None else global_batch
    components = count_parameters(config.model)
    grouped = {column: sum(components.get(name, 0) for name in names) for column, names in COLUMNS.items()}
    grouped["other"] = sum(components.values()) - sum(grouped.values())
    flops = model_flops_per_sample(config.model, global_batch=batch)
    total = sum(components.values())
    return RecipeSize(recipe, grouped, total, flops.forward, flops.training, batch, dict(flops.breakdown))


def format_count(value: int) -> str:
    """A parameter count for people: ``-`` for none, else K, M or B with 3-4 significant digits."""
    if value == 0:
        return "-"
    if value < 1_000_000:
        return f"{value / 1e3:.1f}K"
    if value < 1_000_000_000:
        return f"{value / 1e6:.1f}M"
    return f"{value / 1e9:.2f}B"


def format_gflops(flops: int) -> str:
    """FLOPs in GFLOP with 3 significant digits (at least the integer part); ``-`` for none."""
    if flops == 0:
        return "-"
    gflops = flops / 1e9
    decimals = max(0, 2 - math.floor(math.log10(gflops)))  # 3 significant digits, never an exponent
    return f"{gflops:.{decimals}f}"


def markdown_table(rows: Sequence[RecipeSize]) -> str:
    """The Markdown table of ``rows`` (no trailing newline)."""
    header = ["recipe", *COLUMNS, "other", "total", "forward GFLOP/sample", "training GFLOP/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [f"`{row.recipe}`", *(format_count(row.parameters[c]) for c in (*COLUMNS, "other"))]
        cells += [f"**{format_count(row.total)}**", format_gflops(row.forward_flops), format_gflops(row.training_flops)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(rows: Sequence[RecipeSize]) -> str:
    """Forward GFLOP per sample by component (rows) and recipe (columns), Markdown."""
    components: list[str] = []
    for row in rows:
        components += [name for name in row.flops_breakdown if name not in components]
    lines = [
        "| component | " + " | ".join(f"`{row.recipe}`" for row in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for name in components:
        cells = [format_gflops(row.flops_breakdown.get(name, 0)) for row in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **forward** | " + " | ".join(f"**{format_gflops(row.forward_flops)}**" for row in rows) + " |")
    return "\n".join(lines)


def page(rows: Sequence[RecipeSize], command: str = COMMAND) -> str:
    """docs/model_sizes.md: the table with what it counts and the command that wrote it."""
    batches = ", ".join(f"{row.recipe} {row.global_batch}" for row in rows)
    return f"""# Model sizes of the recipes

Parameters by component and matmul FLOPs per sample of each recipe in `megamm/configs/`,
computed from the configs by `megamm.flops` (`count_parameters`, `model_flops_per_sample`): no
model is built and nothing is measured, so the numbers do not depend on the machine. The
parameter counts equal `sum(p.numel())` of the built model and the FLOPs equal
`torch.utils.flop_counter` on a real forward and backward pass (`tests/test_flops.py`, on small
shapes of every fusion kind and on the tiny recipes).

Written by:

    {command}

{markdown_table(rows)}

- "other": the projections into the shared embedding space, the contrastive temperatures, the
  context projections (image and audio tokens to the text width) and the ITM / VQA heads.
- FLOPs count matrix multiplications only (2 per multiply-add), over the padded sequences the
  model computes on: text `max_length` tokens (captions, questions and answers), the image's
  patches plus a class token, and audio of `model.audio.max_seconds` (tiny: 1 s, 53 tokens;
  base and large: 10 s, 505 tokens). The STFT is not a matmul and is not counted; the mel filterbank is.
- Per sample the whole model runs the three encoders, the contrastive logits of every pair,
  the caption decoder, the fusion three times for image-text matching (the positive and two
  hard negatives), the text encoder and the fusion again on the question, and the decoder on
  the answer. See `megamm/flops.py` for every term.
- Training = forward + backward = 3 x forward, except the mel filterbank and the ITM
  hard-negative similarities, which run without gradient (counted once).
- The contrastive logits depend on the global batch; here each recipe's `micro_batch_size` on
  one rank ({batches}). `tools/model_sizes.py --global-batch N` recounts them.

## Forward GFLOP per sample by component

Keys of `model_flops_per_sample(...).breakdown`; fusion and head terms include the 3 rows of
image-text matching.

{breakdown_table(rows)}
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe names or YAML paths")
    parser.add_argument(
        "--global-batch", type=int, default=None, help="global batch of the contrastive logits (default: micro_batch_size)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the whole page here instead of the table to stdout")
    args = parser.parse_args(argv)
    if args.global_batch is not None and args.global_batch < 1:
        parser.error(f"--global-batch must be >= 1, got {args.global_batch}")
    rows = [recipe_size(recipe, args.global_batch) for recipe in args.recipes]
    if args.output is None:
        print(markdown_table(rows))
        return 0
    command = "python tools/model_sizes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.output.write_text(page(rows, command.strip()))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
