"""Tests of megamm.data: shards, tokenizer, demo dataset and loaders.

Every expectation is checked against an independent reference (tar members read with the
standard library, a separately loaded SentencePiece model, hand-written attribute tables).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
import torch
import webdataset as wds
from PIL import Image

from megamm.config import ConfigError, DataConfig
from megamm.data import (
    ROW_FIELDS,
    DataPosition,
    Tokenizer,
    build_train_loader,
    expand_shards,
    iter_captions,
    iter_eval_batches,
    known_sample_count,
    train_tokenizer,
    write_demo_dataset,
)
from tests.launch import ROOT

IMAGE_SIZE = 16
TEXT_LENGTH = 24
TRAIN_SHARDS = 8
PER_SHARD = 32
EVAL_SAMPLES = 40

# Reference vocabulary of the demo captions, written independently of megamm.data.demo.
PALETTE = {
    "red": (225, 35, 35),
    "green": (35, 200, 55),
    "blue": (45, 85, 245),
    "yellow": (240, 225, 40),
    "cyan": (35, 215, 225),
    "magenta": (215, 45, 220),
    "white": (240, 240, 240),
    "orange": (250, 135, 20),
}
SHAPE_WORDS = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box"),
               "triangle": ("triangle",), "cross": ("cross", "plus sign")}
POSITION_WORDS = {"left": ("left",), "right": ("right",), "top": ("top", "upper"),
                  "bottom": ("bottom", "lower"), "center": ("center", "middle")}
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "center": (0.5, 0.5)}
DirtyData = tuple[Path, set[str], int]


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures


def tar_members(path: str | Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            handle = archive.extractfile(member)
            assert handle is not None
            samples.setdefault(key, {})[extension] = handle.read()
    return samples


def tar_keys(paths: list[str] | list[Path]) -> list[str]:
    return [key for path in paths for key in tar_members(path)]


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, train_shards=TRAIN_SHARDS, samples_per_shard=PER_SHARD,
                       eval_samples=EVAL_SAMPLES, image_size=IMAGE_SIZE, seed=3)
    train_tokenizer(iter_captions(sorted((root / "train").glob("*.tar"))), root / "tokenizer.model", 128)
    return root


@pytest.fixture(scope="session")
def tokenizer(demo: Path) -> Tokenizer:
    return Tokenizer(demo / "tokenizer.model")


def data_cfg(root: Path, tokenizer_path: Path | None = None, **overrides: Any) -> DataConfig:
    settings: dict[str, Any] = dict(
        train_shards=str(root / "train"),
        eval_shards=str(root / "eval"),
        tokenizer=str(tokenizer_path or root / "tokenizer.model"),
        image_size=IMAGE_SIZE,
        max_text_length=TEXT_LENGTH,
        num_workers=0,
        shuffle_buffer=16,
        seed=7,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def take(loader: Any, count: int) -> list[dict[str, Any]]:
    return list(itertools.islice(iter(loader), count))


def batch_keys(batches: list[dict[str, Any]]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def position_after(batches: list[dict[str, Any]]) -> DataPosition:
    """The data position once ``batches`` have been taken, as the trainer records it."""
    position = DataPosition()
    for batch in batches:
        position.advance(batch)
    return position


def assert_batches_equal(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a["keys"] == b["keys"]
        assert a["skipped"] == b["skipped"]
        for name in ROW_FIELDS:  # images, captions, audio, questions and answers
            assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------
# Training loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dp_ranks_partition_one_epoch(demo: Path, tokenizer: Tokenizer, num_workers: int) -> None:
    # The demo's index (sizes.json) deals each epoch out by sample: 128 samples a rank, 64 a
    # stream with two workers; shuffle blocks of 16 divide both, so epochs end on batch edges.
    cfg = data_cfg(demo, num_workers=num_workers)
    shards = sorted(str(p) for p in (demo / "train").glob("*.tar"))
    dp_size, batch_size = 2, 8
    batches_per_epoch = TRAIN_SHARDS * PER_SHARD // dp_size // batch_size  # per rank
    epochs: list[list[set[str]]] = [[], []]
    for rank in range(dp_size):
        batches = take(build_train_loader(cfg, tokenizer, rank, dp_size, batch_size), 2 * batches_per_epoch)
        assert [b["epoch"] for b in batches] == [0] * batches_per_epoch + [1] * batches_per_epoch
        for epoch, part in enumerate((batches[:batches_per_epoch], batches[batches_per_epoch:])):
            keys = batch_keys(part)
            assert len(keys) == len(set(keys)), "a sample repeated within one epoch"
            epochs[epoch].append(set(keys))
        batch = batches[0]
        assert batch["image"].shape == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["image"].dtype == torch.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["text_ids"].shape == batch["text_mask"].shape == (batch_size, TEXT_LENGTH)
        assert batch["text_ids"].dtype == torch.int64 and batch["text_mask"].dtype == torch.bool
        assert bool(batch["has_image"].all() and batch["has_text"].all())
        assert all(b["skipped"] == 0 and b["seen"] == batch_size for b in batches)
    for ranks in epochs:
        assert not ranks[0] & ranks[1], "data-parallel ranks overlap"
        assert ranks[0] | ranks[1] == set(tar_keys(shards)), "an epoch is not every sample"
    assert epochs[0][0] != epochs[1][0], "the next epoch deals the reshuffled shards out anew"


def test_batch_content_matches_tar(demo: Path, tokenizer: Tokenizer) -> None:
    batch = take(build_train_loader(data_cfg(demo), tokenizer, 0, 1, 4), 1)[0]
    members: dict[str, dict[str, bytes]] = {}
    for path in (demo / "train").glob("*.tar"):
        members.update(tar_members(path))
    reference = spm.SentencePieceProcessor(model_file=str(demo / "tokenizer.model"))
    for row, key in enumerate(batch["keys"]):
        pixels = np.asarray(Image.open(io.BytesIO(members[key]["png"])).convert("RGB"), dtype=np.float32)
        expected = torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
        assert torch.allclose(batch["image"][row], expected, atol=1e-6)
        pieces = reference.encode(members[key]["txt"].decode("utf-8"))
        n = len(pieces) + 2
        assert batch["text_ids"][row, :n].tolist() == [2, *pieces, 3]
        assert batch["text_mask"][row].tolist() == [True] * n + [False] * (TEXT_LENGTH - n)


def test_tensor_parallel_peers_get_identical_batches(demo: Path, tokenizer: Tokenizer) -> None:
    cfg = data_cfg(demo, num_workers=2)
    first = take(build_train_loader(cfg, tokenizer, 1, 2, 8), 10)
    second = take(build_train_loader(cfg, tokenizer, 1, 2, 8), 10)
    assert_batches_equal(first, second)
    reseeded = take(build_train_loader(data_cfg(demo, num_workers=2, seed=8), tokenizer, 1, 2, 8), 10)
    assert batch_keys(reseeded) != batch_keys(first), "the seed does not change the order"


def test_global_batches_are_the_same_at_any_data_parallel_size(demo: Path, tokenizer: Tokenizer) -> None:
    """data.global_batches: rank r of dp keeps rows [r*B, (r+1)*B) of the single rank's batch of dp*B,
    at every step; a resumed rank continues from the single rank's position."""
    cfg = data_cfg(demo, num_workers=2, global_batches=True)
    whole = take(build_train_loader(cfg, tokenizer, 0, 1, 8), 12)
    for dp_size in (2, 4):
        per_rank = 8 // dp_size
        shares = [take(build_train_loader(cfg, tokenizer, r, dp_size, per_rank), 12) for r in range(dp_size)]
        for step, batch in enumerate(whole):
            parts = [share[step] for share in shares]
            assert [key for part in parts for key in part["keys"]] == batch["keys"]
            for name in ROW_FIELDS:
                assert torch.equal(torch.cat([part[name] for part in parts]), batch[name]), name
            assert parts[0]["position"] == batch["position"] and parts[0]["stream"] == batch["stream"]
    resumed = take(build_train_loader(cfg, tokenizer, 1, 2, 4, position_after(whole[:5])), 7)
    assert [b["keys"] for b in resumed] == [b["keys"][4:] for b in whole[5:]]


@pytest.mark.parametrize(("num_workers", "start_batch"), [(0, 5), (0, 25), (2, 3), (2, 25)])
def test_resume_equals_dropping_batches(
    demo: Path, tokenizer: Tokenizer, num_workers: int, start_batch: int
) -> None:
    # micro-batch 6 does not divide a stream's epoch (128 or 64 samples): batches straddle epochs,
    # and 25 batches run past the first epoch of every stream.
    cfg = data_cfg(demo, num_workers=num_workers)
    after = 8
    full = take(build_train_loader(cfg, tokenizer, 1, 2, 6), start_batch + after)
    resumed = take(build_train_loader(cfg, tokenizer, 1, 2, 6, position_after(full[:start_batch])), after)
    assert_batches_equal(full[start_batch:], resumed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_another_micro_batch_size_neither_skips_nor_repeats(
    demo: Path, tokenizer: Tokenizer, num_workers: int
) -> None:
    # 3 batches of 4 per stream, then resumed at 8: the skeleton counted batches, so it skipped
    # samples 12-23 of the stream. Positions count samples: the stream continues at sample 12.
    cfg = data_cfg(demo, num_workers=num_workers)
    workers = max(num_workers, 1)
    stream_order = {
        worker: batch_keys(take(build_train_loader(cfg, tokenizer, 0, 1, 1), 60 * workers)[worker::workers])
        for worker in range(workers)
    }
    small = take(build_train_loader(cfg, tokenizer, 0, 1, 4), 3 * workers)
    position = position_after(small)
    assert {stream: state["offset"] for stream, state in position.streams.items()} == {w: 12 for w in range(workers)}
    large = take(build_train_loader(cfg, tokenizer, 0, 1, 8, position), 2 * workers)
    for worker in range(workers):
        taken = batch_keys(small[worker::workers]) + batch_keys(large[worker::workers])
        assert taken == stream_order[worker][:28], f"stream {worker} skipped or repeated samples"


def test_loader_configuration_errors(demo: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    for shard in (demo / "train").glob("*.tar"):
        shutil.copy(shard, tmp_path / shard.name)  # without the index (sizes.json)
    with pytest.raises(ConfigError, match=r"data\.train_shards has 8 shards and no sample-count index.*data\.num_workers"):
        build_train_loader(data_cfg(demo, num_workers=3, train_shards=str(tmp_path)), tokenizer, 0, 4, 8)  # 8 < 4 x 3
    assert take(build_train_loader(data_cfg(demo, num_workers=3), tokenizer, 3, 4, 8), 1), "with the index, streams share shards"
    with pytest.raises(ConfigError, match=r"data\.train_shards='.*missing.*' matched no files"):
        build_train_loader(data_cfg(demo, train_shards=str(demo / "missing" / "*.tar")), tokenizer, 0, 1, 8)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(data_cfg(demo), tokenizer, 2, 2, 8)


# ----------------------------------------------------------------------------------------------
# Bad samples


def corrupt_pixels_png(seed: int) -> bytes:
    """A PNG whose header reads but whose pixel data is cut off: it fails only when decoded."""
    return png_bytes(seed)[:80]


def write_shard_with_bad_samples(path: Path) -> tuple[list[str], int]:
    """Four bad samples first (the last one with a readable header but corrupt pixels), then six
    good ones; returns (good keys, bad count)."""
    good = [f"extra-{i:03d}" for i in range(6)]
    with wds.TarWriter(str(path), encoder=False) as writer:
        writer.write({"__key__": "bad-garbage", "png": b"this is not a png", "txt": b"a red circle"})
        writer.write({"__key__": "bad-notxt", "png": png_bytes(1)})
        writer.write({"__key__": "bad-emptytxt", "png": png_bytes(2), "txt": b"   "})
        writer.write({"__key__": "bad-pixels", "png": corrupt_pixels_png(3), "txt": b"a blue square"})
        for i, key in enumerate(good):
            writer.write({"__key__": key, "png": png_bytes(10 + i), "txt": f"caption {i}".encode()})
    return good, 4


@pytest.fixture()
def dirty_data(demo: Path, tmp_path: Path) -> DirtyData:
    """Two good demo shards plus one with bad samples; returns (dir, good keys, bad count)."""
    shard_dir = tmp_path / "dirty"
    shard_dir.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy(demo / "train" / name, shard_dir / name)
    good, bad = write_shard_with_bad_samples(shard_dir / "shard-000002.tar")
    keys = set(tar_keys(sorted(shard_dir.glob("shard-00000[01].tar")))) | set(good)
    return shard_dir, keys, bad


def test_bad_samples_are_skipped_and_counted(demo: Path, tokenizer: Tokenizer, dirty_data: DirtyData) -> None:
    shard_dir, good_keys, bad = dirty_data
    assert len(good_keys) == 70
    cfg = data_cfg(demo, train_shards=str(shard_dir), shuffle_buffer=0)
    batches = take(build_train_loader(cfg, tokenizer, 0, 1, 10), 14)  # two epochs of 70
    for epoch in (batches[:7], batches[7:]):
        keys = batch_keys(epoch)
        assert sorted(keys) == sorted(good_keys)
        # the bad samples lead their shard, so they are counted within the same epoch
        assert sum(b["skipped"] for b in epoch) == bad


def test_eval_batches_skip_bad_samples(demo: Path, tokenizer: Tokenizer, dirty_data: DirtyData) -> None:
    shard_dir, good_keys, bad = dirty_data
    cfg = data_cfg(demo, eval_shards=str(shard_dir / "shard-{000000..000002}.tar"))
    batches = list(iter_eval_batches(cfg, tokenizer, 32))
    assert [len(b["keys"]) for b in batches] == [32, 32, 6]
    expected_order = [k for k in tar_keys(sorted(shard_dir.glob("*.tar"))) if k in good_keys]
    assert batch_keys(batches) == expected_order
    assert sum(b["skipped"] for b in batches) == bad


def test_eval_set_is_streamed_in_shares_over_data_parallel_ranks(demo: Path, tokenizer: Tokenizer) -> None:
    # Each rank reads only its shards (shards[rank::dp]); together they cover the set once.
    shards = sorted((demo / "train").glob("*.tar"))
    cfg = data_cfg(demo, eval_shards=str(demo / "train"))
    whole = batch_keys(list(iter_eval_batches(cfg, tokenizer, 16)))
    shares = [batch_keys(list(iter_eval_batches(cfg, tokenizer, 16, rank, 3))) for rank in range(3)]
    for rank, share in enumerate(shares):
        assert share == tar_keys(shards[rank::3])
    assert sorted(key for share in shares for key in share) == sorted(whole)
    lonely = data_cfg(demo)  # one evaluation shard, two ranks: rank 1 gets none, and no error
    assert list(iter_eval_batches(lonely, tokenizer, 16, 1, 2)) == []


def test_truncated_shard_does_not_stop_reading(demo: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    source = demo / "train" / "shard-000000.tar"
    data = source.read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    shutil.copy(demo / "train" / "shard-000001.tar", tmp_path / "b.tar")
    cfg = data_cfg(demo, eval_shards=str(tmp_path))
    batches = list(iter_eval_batches(cfg, tokenizer, 16))
    keys = batch_keys(batches)
    assert set(tar_keys([tmp_path / "b.tar"])) <= set(keys)
    assert set(keys) < set(tar_keys([source, tmp_path / "b.tar"]))
    assert sum(b["skipped"] for b in batches) >= 1


def test_eval_batches_in_file_order(demo: Path, tokenizer: Tokenizer) -> None:
    batches = list(iter_eval_batches(data_cfg(demo), tokenizer, 16))
    assert [len(b["keys"]) for b in batches] == [16, 16, 8]
    assert batch_keys(batches) == tar_keys([demo / "eval" / "shard-000000.tar"])


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_encoding(demo: Path, tokenizer: Tokenizer) -> None:
    reference = spm.SentencePieceProcessor(model_file=str(demo / "tokenizer.model"))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert reference.unk_id() == 1
    assert 4 < tokenizer.vocab_size <= 128
    text = "a red circle on the left"
    pieces = reference.encode(text)
    n = len(pieces) + 2

    ids, mask = tokenizer.encode(text, 20)
    assert ids == [2, *pieces, 3] + [0] * (20 - n)
    assert mask == [True] * n + [False] * (20 - n)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text

    exact_ids, exact_mask = tokenizer.encode(text, n)
    assert exact_ids == [2, *pieces, 3] and all(exact_mask)

    long_text = " ".join([text] * 10)
    long_pieces = reference.encode(long_text)
    cut_ids, cut_mask = tokenizer.encode(long_text, 6)
    assert cut_ids == [2, *long_pieces[:4], 3]
    assert cut_mask == [True] * 6

    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(text, 1)


def test_tokenizer_missing_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*does not exist.*tools/train_tokenizer\.py"):
        Tokenizer(tmp_path / "nope.model")


def test_train_tokenizer_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "tok.model"
    path.write_bytes(b"old")
    captions = ["a blue square at the top", "a green cross on the right"] * 20
    assert train_tokenizer(captions, path, 64) == path
    assert sorted(os.listdir(tmp_path)) == ["tok.model"]  # no temporary file left behind
    assert Tokenizer(path).encode("a blue square", 8)[0][0] == 2
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer(["", "  "], tmp_path / "empty.model", 64)
    assert not (tmp_path / "empty.model").exists()
    with pytest.raises(ValueError, match=r"\.model"):
        train_tokenizer(captions, tmp_path / "tok.bin", 64)


# ----------------------------------------------------------------------------------------------
# Shard specifications


@pytest.fixture()
def shard_tree(tmp_path: Path) -> Path:
    for i in range(4):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_expand_shards_forms(shard_tree: Path) -> None:
    all_four = [str(shard_tree / f"shard-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shard_tree / "shard-{000000..000003}.tar"), "f") == all_four
    assert expand_shards(str(shard_tree / "shard-{000003,000001}.tar"), "f") == [all_four[1], all_four[3]]
    assert expand_shards(str(shard_tree / "shard-00000[12].tar"), "f") == all_four[1:3]
    assert expand_shards(str(shard_tree / "*.tar"), "f") == all_four
    assert expand_shards(str(shard_tree), "f") == all_four
    comma = f"{all_four[2]}, {all_four[0]},{shard_tree}/shard-{{000000..000001}}.tar"
    assert expand_shards(comma, "f") == all_four[:3]


def test_expand_shards_errors(shard_tree: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train_shards=.*matched no files.*make_demo_data"):
        expand_shards(str(shard_tree / "nothing-*.tar"), "data.train_shards")
    with pytest.raises(ConfigError, match=r"data\.eval_shards=.*shard-000004\.tar' does not exist"):
        expand_shards(str(shard_tree / "shard-{000000..000004}.tar"), "data.eval_shards")
    with pytest.raises(ConfigError, match=r"data\.train_shards=.*contains no \.tar shards"):
        expand_shards(str(shard_tree / "empty"), "data.train_shards")
    with pytest.raises(ConfigError, match=r"data\.train_shards.*[Uu]nbalanced"):
        expand_shards(str(shard_tree / "shard-{000000..000001.tar"), "data.train_shards")
    with pytest.raises(ConfigError, match=r"data\.train_shards is empty"):
        expand_shards(" ", "data.train_shards")


# ----------------------------------------------------------------------------------------------
# Demo dataset


def check_sample(sample: dict[str, bytes]) -> tuple[str, str, str]:
    """Assert the image and caption show the attributes; returns (colour, shape, position)."""
    attributes = json.loads(sample["json"])
    colour, shape, position = attributes["colour"], attributes["shape"], attributes["position"]
    caption = sample["txt"].decode("utf-8")
    assert colour in caption.split() or f"{colour}," in caption
    assert any(word in caption for word in SHAPE_WORDS[shape]), caption
    assert any(word in caption for word in POSITION_WORDS[position]), caption
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.int32)
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    cx, cy = attributes["center_xy"]
    anchor_x, anchor_y = ANCHORS[position]
    assert abs(cx / IMAGE_SIZE - anchor_x) <= 0.06 and abs(cy / IMAGE_SIZE - anchor_y) <= 0.06
    centre = pixels[int(cy), int(cx)]
    nearest = min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name]) - centre) ** 2)))
    assert nearest == colour, f"centre pixel {centre} looks {nearest}, caption says {colour}"
    return colour, shape, position


def test_demo_eval_split_has_unique_combinations(demo: Path) -> None:
    samples = tar_members(demo / "eval" / "shard-000000.tar")
    assert sorted(samples) == [f"eval-{i:06d}" for i in range(EVAL_SAMPLES)]
    combos = [check_sample(sample) for sample in samples.values()]
    assert len(set(combos)) == EVAL_SAMPLES


def test_demo_train_split_is_learnable(demo: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["train"]["samples"] == TRAIN_SHARDS * PER_SHARD
    assert manifest["eval"]["samples"] == EVAL_SAMPLES
    combos = []
    for path in sorted((demo / "train").glob("*.tar")):
        combos += [check_sample(sample) for sample in tar_members(path).values()]
    assert len(combos) == TRAIN_SHARDS * PER_SHARD
    colours, shapes, positions = (set(column) for column in zip(*combos))
    assert colours == set(PALETTE) and shapes == set(SHAPE_WORDS) and positions == set(ANCHORS)


def file_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_generation_is_reused_and_deterministic(tmp_path: Path) -> None:
    params = dict(train_shards=3, samples_per_shard=4, eval_samples=5, image_size=16, seed=1, workers=1)
    first = write_demo_dataset(tmp_path / "a", **params)
    assert first["reused"] is False
    before = file_state(tmp_path / "a")
    assert set(before) == {"manifest.json", "eval/shard-000000.tar", "eval/sizes.json", "train/sizes.json",
                           "train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar"}
    sizes = json.loads((tmp_path / "a" / "train" / "sizes.json").read_text())
    assert sizes == {f"shard-{i:06d}.tar": 4 for i in range(3)}
    assert known_sample_count([str(tmp_path / "a" / "train" / f"shard-{i:06d}.tar") for i in range(3)]) == 12
    assert known_sample_count([str(tmp_path / "a" / "train" / "shard-000000.tar"), str(tmp_path / "x.tar")]) is None
    again = write_demo_dataset(tmp_path / "a", **params)
    assert again["reused"] is True and file_state(tmp_path / "a") == before

    write_demo_dataset(tmp_path / "b", **{**params, "workers": 2})
    for name in before:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    smaller = write_demo_dataset(tmp_path / "a", **{**params, "train_shards": 2, "seed": 2})
    assert smaller["reused"] is False
    assert not (tmp_path / "a" / "train" / "shard-000002.tar").exists(), "stale shard left behind"
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["params"]["seed"] == 2
    assert (tmp_path / "a" / "train" / "shard-000000.tar").read_bytes() != (
        tmp_path / "b" / "train" / "shard-000000.tar").read_bytes()


def test_demo_generation_never_touches_shards_it_did_not_write(tmp_path: Path) -> None:
    params = dict(train_shards=2, samples_per_shard=4, eval_samples=5, image_size=16, seed=1, workers=1)
    theirs = tmp_path / "data" / "train"
    theirs.mkdir(parents=True)
    for index in range(12):  # a user's own shards, with the generator's file names
        (theirs / f"shard-{index:06d}.tar").write_bytes(f"user shard {index}".encode())
    before = file_state(tmp_path / "data")
    command = [sys.executable, str(ROOT / "tools/make_demo_data.py"), "--out", str(tmp_path / "data")]
    for key, value in params.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "12 file(s) this generator did not write" in result.stderr and "--force" in result.stderr
    assert file_state(tmp_path / "data") == before

    forced = subprocess.run(command + ["--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "replacing or deleting" in forced.stderr and "shard-000011.tar" in forced.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "sizes.json"]

    out_file = tmp_path / "a-file"
    out_file.write_text("x")
    named_file = subprocess.run(command[:3] + [str(out_file)], capture_output=True, text=True, timeout=120)
    assert named_file.returncode == 2 and "is a file; name a directory" in named_file.stderr


def test_interrupted_generation_is_redone_not_refused(tmp_path: Path) -> None:
    params = dict(train_shards=2, samples_per_shard=4, eval_samples=5, image_size=16, seed=1, workers=1)
    write_demo_dataset(tmp_path, **params)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = False  # as an interrupted run leaves it
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    redone = write_demo_dataset(tmp_path, **params)
    assert redone["reused"] is False and redone["complete"] is True


def test_demo_rejects_too_many_eval_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_samples=161"):
        write_demo_dataset(tmp_path, eval_samples=161)


@pytest.mark.parametrize(("num_workers", "start_batch"), [(0, 4), (0, 9), (2, 5)])
def test_resume_is_exact_across_bad_samples(
    demo: Path, tokenizer: Tokenizer, dirty_data: DirtyData, num_workers: int, start_batch: int
) -> None:
    shard_dir, _, _ = dirty_data
    cfg = data_cfg(demo, train_shards=str(shard_dir), num_workers=num_workers)
    full = take(build_train_loader(cfg, tokenizer, 0, 1, 10), start_batch + 6)
    assert sum(b["skipped"] for b in full) >= 4, "the bad samples were not met"
    resumed = take(build_train_loader(cfg, tokenizer, 0, 1, 10, position_after(full[:start_batch])), 6)
    assert_batches_equal(full[start_batch:], resumed)


def test_resume_just_before_an_undecodable_image_after_the_first_epoch(
    demo: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    # One stream, one shard: [corrupt pixels, 12 good], in the same order every epoch. The
    # skeleton resumed at candidate 13 (epoch 1, just before the corrupt image) and raised
    # "no image decoded for a whole epoch"; auto-resume then looped on it.
    shard_dir = tmp_path / "one"
    shard_dir.mkdir()
    with wds.TarWriter(str(shard_dir / "shard-000000.tar"), encoder=False) as writer:
        writer.write({"__key__": "bad-pixels", "png": corrupt_pixels_png(5), "txt": b"a red circle"})
        for i in range(12):
            writer.write({"__key__": f"good-{i:02d}", "png": png_bytes(20 + i), "txt": f"caption {i}".encode()})
    cfg = data_cfg(demo, train_shards=str(shard_dir), shuffle_buffer=0)
    full = take(build_train_loader(cfg, tokenizer, 0, 1, 4), 6)  # two epochs of 12 decoded images
    assert [b["seen"] for b in full] == [5, 4, 4, 5, 4, 4]
    assert full[2]["position"]["sources"][0]["open"] == [[0, 13]], "the end of the shard, not yet of the epoch"
    resumed = take(build_train_loader(cfg, tokenizer, 0, 1, 4, position_after(full[:3])), 3)
    assert_batches_equal(full[3:], resumed)
    assert resumed[0]["skipped"] == 1 and resumed[0]["keys"][0] == "good-00"
