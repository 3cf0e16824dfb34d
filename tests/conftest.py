"""Fixtures shared by test files that run the real entry points."""

from __future__ import annotations

import pytest

from megamm.data import iter_captions, train_tokenizer, write_demo_dataset


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, str]:
    """A small demo dataset (4 train shards of 32 samples, 40 eval samples) and its tokenizer, as
    overrides; every run checks that its tensor- and pipeline-parallel peers read the same samples."""
    root = tmp_path_factory.mktemp("data")
    write_demo_dataset(root, train_shards=4, samples_per_shard=32, eval_samples=40, image_size=32, seed=0)
    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    tokenizer = train_tokenizer(iter_captions(shards, include_questions=True), root / "tok.model", 256)
    return {
        "data.train_shards": str(root / "train"),
        "data.eval_shards": str(root / "eval"),
        "data.tokenizer": str(tokenizer),
        "data.check_keys_every": "1",
    }
