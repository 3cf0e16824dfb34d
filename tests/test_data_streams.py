"""The training data streams at scale: epochs over uneven shards, distribution over data-parallel
ranks and workers, exact resume at O(shard) cost, pipe: sources and mixtures, bad data.

References are independent of the loader: keys and bytes read back with the standard library's
tarfile, sample counts by construction, shards written by GNU tar.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.config import ConfigError, DataConfig, SourceConfig
from megamm.data import (
    BAD_REASONS,
    ROW_FIELDS,
    DataPosition,
    ShardReader,
    Tokenizer,
    bad_summary,
    build_train_loader,
    encode_wav,
    iter_eval_batches,
    next_epochs,
    train_tokenizer,
)
from megamm.data.pipeline import _TrainStreams, build_sources, make_decoder
from tests.test_data import batch_keys as keys_of
from tests.test_data import position_after, take
from megamm.data.streams import epoch_pieces, initial_state

IMAGE_SIZE = 8
TEXT_LENGTH = 12
UNEVEN = (3, 17, 8, 25, 1, 12, 9)
"""Samples per shard: 75, over 7 shards, dividing over neither 2 nor 4 streams."""


def jpeg(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """Samples ``{"__key__": key, ext: bytes}`` as a tar, written with the standard library."""
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            key = sample["__key__"].decode() if isinstance(sample["__key__"], bytes) else sample["__key__"]
            for extension, data in sample.items():
                if extension == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def good(key: str, seed: int) -> dict[str, Any]:
    return {"__key__": key, "jpg": jpeg(seed), "txt": f"sample {key}".encode()}


def write_uneven(root: Path, sizes: tuple[int, ...] = UNEVEN, index: bool = True, prefix: str = "s") -> list[str]:
    """Shards of ``sizes`` samples, plus their sizes.json; returns every key."""
    root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    table = {}
    for shard, count in enumerate(sizes):
        samples = [good(f"{prefix}{shard}-{i:03d}", 100 * shard + i) for i in range(count)]
        write_tar(root / f"shard-{shard:06d}.tar", samples)
        table[f"shard-{shard:06d}.tar"] = count
        keys += [s["__key__"] for s in samples]
    if index:
        (root / "sizes.json").write_text(json.dumps(table))
    return keys


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    words = [f"sample s{a}-{b:03d} red blue" for a in range(12) for b in range(60)]
    return Tokenizer(train_tokenizer(iter(words), root / "tok.model", 64))


def cfg_for(root: Path, tokenizer: Tokenizer, **overrides: Any) -> DataConfig:
    settings: dict[str, Any] = dict(
        train_shards=str(root), eval_shards=str(root), tokenizer=str(tokenizer.path), image_size=IMAGE_SIZE,
        max_text_length=TEXT_LENGTH, num_workers=0, shuffle_buffer=8, open_shards=3, seed=11,
    )  # fmt: skip
    settings.update(overrides)
    return DataConfig(**settings)




# ----------------------------------------------------------------------------------------------
# Epochs and distribution


def test_epochs_over_uneven_shards_see_every_key_once_over_2_ranks_x_2_workers(tmp_path: Path, tokenizer: Tokenizer) -> None:
    keys = write_uneven(tmp_path / "uneven")
    cfg = cfg_for(tmp_path / "uneven", tokenizer, num_workers=2)
    per_epoch: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    ranks: list[list[dict[str, Any]]] = []
    for rank in range(2):
        batches = take(build_train_loader(cfg, tokenizer, rank, 2, 1), 2 * 38)  # one sample a batch
        ranks.append(batches)
        for batch in batches:
            per_epoch.setdefault(batch["epoch"], Counter())[batch["keys"][0]] += 1
        by_stream = Counter(batch["stream"] for batch in batches)
        assert by_stream == {2 * rank: 38, 2 * rank + 1: 38}, "workers take turns"
    # 75 samples over 4 streams: 18 or 19 each, so 38 batches of each stream cover its epoch 0.
    assert per_epoch[0] == Counter(keys), "epoch 0 is not every key exactly once"
    assert set(per_epoch[1]) <= set(keys) and max(per_epoch[1].values()) == 1
    first = [[b["keys"][0] for b in batches if b["epoch"] == 0] for batches in ranks]
    assert not set(first[0]) & set(first[1]), "data-parallel ranks overlap"
    # Peers (tensor/pipeline-parallel ranks of a data-parallel rank) read identical batches.
    again = take(build_train_loader(cfg, tokenizer, 1, 2, 1), 2 * 38)
    assert keys_of(again) == keys_of(ranks[1])


def test_stream_shares_follow_the_shuffled_shard_sequence(tmp_path: Path) -> None:
    """The pieces of an epoch: the shuffled shards, cut at N s / S by sample."""
    from megamm.data.streams import Source

    source = Source(tuple(f"{i}.tar" for i in range(len(UNEVEN))), 1.0, UNEVEN)
    for streams in (1, 2, 3, 4, 80):
        covered: list[tuple[int, int]] = []
        for stream in range(streams):
            pieces = epoch_pieces(source, 0, 5, stream, streams, 3, "epochs")
            count = sum(p.stop - p.start for p in pieces)  # type: ignore[operator]
            assert count in (75 // streams, 75 // streams + 1)
            covered += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]  # type: ignore[arg-type]
        assert sorted(covered) == sorted((shard, i) for shard, n in enumerate(UNEVEN) for i in range(n))
    other = epoch_pieces(source, 0, 6, 0, 2, 3, "epochs")
    assert other != epoch_pieces(source, 0, 5, 0, 2, 3, "epochs"), "epochs reshuffle the shards"


def test_without_an_index_shards_are_dealt_whole_and_too_few_is_an_error(tmp_path: Path, tokenizer: Tokenizer) -> None:
    keys = write_uneven(tmp_path / "plain", index=False)
    cfg = cfg_for(tmp_path / "plain", tokenizer)
    batches = take(build_train_loader(cfg, tokenizer, 0, 1, 1), 90)  # one sample a batch
    assert Counter(b["keys"][0] for b in batches if b["epoch"] == 0) == Counter(keys), "an epoch is every key once"
    with pytest.raises(ConfigError, match=r"7 shards and no sample-count index.*need at least 8 shards.*sizes\.json"):
        build_train_loader(cfg_for(tmp_path / "plain", tokenizer, num_workers=4), tokenizer, 0, 2, 5)
    # With the index, 8 streams share 7 shards by sample; with resampling, no index is needed.
    write_uneven(tmp_path / "indexed")
    assert take(build_train_loader(cfg_for(tmp_path / "indexed", tokenizer, num_workers=4), tokenizer, 1, 2, 3), 4)
    resampled = cfg_for(tmp_path / "plain", tokenizer, num_workers=4, sampling="resample")
    assert take(build_train_loader(resampled, tokenizer, 1, 2, 3), 4)


def test_resampling_is_seeded_per_epoch_and_worker(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_uneven(tmp_path / "data")
    cfg = cfg_for(tmp_path / "data", tokenizer, sampling="resample", num_workers=2)
    first = take(build_train_loader(cfg, tokenizer, 0, 1, 4), 30)
    assert keys_of(first) == keys_of(take(build_train_loader(cfg, tokenizer, 0, 1, 4), 30)), "not deterministic"
    streams = [keys_of(first[w::2]) for w in range(2)]
    assert streams[0] != streams[1], "workers draw the same shards"
    counts = Counter(keys_of(first))
    assert max(counts.values()) > 1, "draws with replacement repeat samples"
    reseeded = take(build_train_loader(cfg_for(tmp_path / "data", tokenizer, sampling="resample", num_workers=2, seed=12), tokenizer, 0, 1, 4), 30)
    assert keys_of(reseeded) != keys_of(first)


# ----------------------------------------------------------------------------------------------
# Exact resume at O(shard) cost


def write_large(root: Path, shards: int, per_shard: int) -> None:
    """``shards`` shards of ``per_shard`` samples of ~4 KB each, with an index."""
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for shard in range(shards):
        samples = [
            {"__key__": f"k{shard:03d}-{i:03d}", "jpg": jpeg(shard * 1000 + i, 40), "txt": b"sample red"}
            for i in range(per_shard)
        ]
        write_tar(root / f"shard-{shard:06d}.tar", samples)
        table[f"shard-{shard:06d}.tar"] = per_shard
    (root / "sizes.json").write_text(json.dumps(table))


def resume_cost(cfg: DataConfig, tokenizer: Tokenizer, state: dict[str, Any]) -> tuple[int, list[str]]:
    """Bytes read before the first batch after resuming at ``state``, and that batch's keys."""
    sources = build_sources(cfg)
    streams = _TrainStreams(cfg, sources, tokenizer, 0, 1, 4, DataPosition(), make_decoder(cfg, (), None))
    counter = [0]
    batch = next(iter(streams.batches(0, state, counter)))
    return counter[0], batch["keys"]


def test_resume_mid_shard_is_exact_and_reads_at_most_a_shard(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_large(tmp_path / "big", shards=12, per_shard=30)
    shard_bytes = min(p.stat().st_size for p in (tmp_path / "big").glob("*.tar"))
    cfg = cfg_for(tmp_path / "big", tokenizer, shuffle_buffer=16, open_shards=3)
    full = take(build_train_loader(cfg, tokenizer, 0, 1, 4), 250)  # 1000 samples: past two epochs of 360
    for start in (7, 93, 181, 246):  # mid-block, mid-shard, in epochs 0, 1 and 2
        state = position_after(full[:start]).streams[0]
        assert state["offset"] % 16 != 0 and any(consumed for _, consumed in state["sources"][0]["open"])
        resumed = take(build_train_loader(cfg, tokenizer, 0, 1, 4, position_after(full[:start])), 4)
        for a, b in zip(full[start : start + 4], resumed):
            assert a["keys"] == b["keys"]
            for name in ROW_FIELDS:
                assert torch.equal(a[name], b[name]), name
        cost, first_keys = resume_cost(cfg, tokenizer, state)
        assert first_keys == full[start]["keys"]
        assert cost <= shard_bytes, f"resuming at batch {start} read {cost} bytes, more than a shard ({shard_bytes})"


def test_shard_reader_skips_by_headers(tmp_path: Path) -> None:
    write_large(tmp_path / "one", shards=1, per_shard=30)
    path = str(tmp_path / "one" / "shard-000000.tar")
    reader = ShardReader(path)
    assert reader.skip(29) == 29
    assert reader.bytes_read < 30 * 2 * 512 + 512, "skipping read more than the headers"
    last = reader.next()
    assert last is not None and last["__key__"] == "k000-029"
    with tarfile.open(path) as archive:
        assert last["jpg"] == archive.extractfile("k000-029.jpg").read()  # type: ignore[union-attr]
    assert reader.next() is None and reader.error is None


# ----------------------------------------------------------------------------------------------
# Sources


def test_pipe_sources_and_weighted_mixing(tmp_path: Path, tokenizer: Tokenizer) -> None:
    a_keys = write_uneven(tmp_path / "a", sizes=(20, 20, 20, 20), prefix="a")
    b_keys = write_uneven(tmp_path / "b", sizes=(15, 15), prefix="b")
    piped = f"pipe:cat {tmp_path / 'b'}/shard-{{000000..000001}}.tar"
    cfg = cfg_for(
        tmp_path / "a", tokenizer,
        sources=[
            SourceConfig(shards=str(tmp_path / "a"), weight=3.0),
            SourceConfig(shards=piped, weight=1.0, index=str(tmp_path / "b" / "sizes.json")),
        ],
    )  # fmt: skip
    batches = take(build_train_loader(cfg, tokenizer, 0, 1, 10), 40)
    keys = keys_of(batches)
    from_b = [key for key in keys if key.startswith("b")]
    assert set(keys) == set(a_keys) | set(b_keys)
    # Weights 3:1 -> about 100 of the 400 samples from b (binomial sd ~9).
    assert 70 <= len(from_b) <= 130, len(from_b)
    # Each source goes through its own epochs: b's first 30 samples are its 30 keys once.
    assert Counter(from_b[:30]) == Counter(b_keys)
    assert keys_of(take(build_train_loader(cfg, tokenizer, 0, 1, 10), 40)) == keys, "a mixture is deterministic too"
    resumed = take(build_train_loader(cfg, tokenizer, 0, 1, 10, position_after(batches[:17])), 5)
    assert keys_of(resumed) == keys_of(batches[17:22]), "a mixture resumes exactly, pipe: source included"


def test_failing_pipe_is_counted_and_reading_goes_on(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_uneven(tmp_path / "ok", sizes=(10, 10), index=False)
    spec = f"{tmp_path / 'ok'},pipe:cat {tmp_path / 'missing.tar'}"
    cfg = cfg_for(tmp_path / "ok", tokenizer, train_shards=spec, open_shards=3)
    batches = take(build_train_loader(cfg, tokenizer, 0, 1, 5), 8)
    bad = Counter()
    for batch in batches:
        bad.update(batch["bad"])
    assert bad["pipe_failed"] >= 1
    assert len(set(keys_of(batches))) == 20


# ----------------------------------------------------------------------------------------------
# GNU tar shards


def test_shards_written_by_gnu_tar_read_correctly(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """``tar -cf shard.tar -C dir .``: a ``./`` directory entry, ``./`` prefixes, sub-folders and a
    name longer than 100 characters (a GNU long-name record)."""
    folder = tmp_path / "files"
    long_dir = folder / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    expected: dict[str, bytes] = {}
    for index, directory in enumerate([folder, folder / "sub", long_dir]):
        directory.mkdir(parents=True, exist_ok=True)
        image = jpeg(500 + index)
        (directory / f"img{index}.jpg").write_bytes(image)
        (directory / f"img{index}.txt").write_text(f"sample red {index}")
        key = str((directory / f"img{index}").relative_to(folder))
        expected[key] = image
    shard = tmp_path / "shards" / "gnu.tar"
    shard.parent.mkdir()
    subprocess.run(["tar", "--format=gnu", "-cf", str(shard), "-C", str(folder), "."], check=True)
    reader = ShardReader(str(shard))
    read = {}
    while (sample := reader.next()) is not None:
        read[sample["__key__"]] = sample
    assert reader.error is None
    assert set(read) == set(expected)
    for key, image in expected.items():
        assert read[key]["jpg"] == image and read[key]["txt"].decode().startswith("sample red")
    batches = list(iter_eval_batches(cfg_for(shard.parent, tokenizer, eval_shards=str(shard)), tokenizer, 8))
    assert sorted(keys_of(batches)) == sorted(expected) and batches[0]["skipped"] == 0


# ----------------------------------------------------------------------------------------------
# Bad data


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_SAMPLES: dict[str, dict[str, Any]] = {
    "image_corrupt": {"jpg": b"\xff\xd8 not a jpeg", "txt": b"sample red"},
    "caption_empty": {"jpg": jpeg(1), "txt": b"  \n"},
    "caption_missing": {"jpg": jpeg(2)},
    "caption_not_utf8": {"jpg": jpeg(3), "txt": b"\xff\xfe red"},
    "json_invalid": {"jpg": jpeg(4), "json": b"{captions: nope"},
    "audio_undecodable": {"jpg": jpeg(5), "txt": b"sample red", "flac": b"fLaC garbage"},
}


def test_each_bad_sample_is_skipped_and_counted_by_reason(tmp_path: Path, tokenizer: Tokenizer) -> None:
    root = tmp_path / "dirty"
    root.mkdir()
    samples = [good(f"s0-{i:03d}", i) for i in range(10)]
    samples += [{"__key__": f"bad-{reason}", **members} for reason, members in BAD_SAMPLES.items()]
    truncated_png = png(7)
    samples.append({"__key__": "bad-truncated", "png": truncated_png[: len(truncated_png) // 2], "txt": b"sample red"})
    write_tar(root / "shard-000000.tar", samples)
    cfg = cfg_for(root, tokenizer, eval_shards=str(root / "shard-000000.tar"))
    batches = list(iter_eval_batches(cfg, tokenizer, 4, extras=("audio",)))
    assert sorted(keys_of(batches)) == [f"s0-{i:03d}" for i in range(10)]
    bad: Counter[str] = Counter()
    for batch in batches:
        bad.update(batch["bad"])
    assert bad == Counter({**{reason: 1 for reason in BAD_SAMPLES}, "image_corrupt": 2})
    assert set(bad) <= set(BAD_REASONS)
    train = take(build_train_loader(cfg, tokenizer, 0, 1, 5, extras=("audio",)), 6)  # three epochs
    counted: Counter[str] = Counter()
    for batch in train:
        counted.update(batch["bad"])
        assert sum(batch["bad_shards"].values()) == batch["skipped"] == sum(batch["bad"].values())
    assert set(counted) == set(bad) and all(2 <= counted[r] <= 3 * bad[r] for r in bad), counted
    assert sum(batch["seen"] for batch in train) == 30 + sum(counted.values())


def test_broken_shards_are_counted_and_reading_goes_on(tmp_path: Path, tokenizer: Tokenizer) -> None:
    root = tmp_path / "shards"
    keys = write_uneven(root, sizes=(6, 6), index=False)
    data = (root / "shard-000001.tar").read_bytes()
    (root / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (root / "shard-000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    spec = [str(root), f"pipe:cat {tmp_path / 'missing.tar'}", "pipe:exit 3"]  # a YAML list of specifications
    cfg = cfg_for(root, tokenizer, train_shards=spec, open_shards=2)
    batches = take(build_train_loader(cfg, tokenizer, 0, 1, 3), 6)
    bad: Counter[str] = Counter()
    for batch in batches:
        bad.update(batch["bad"])
    assert bad["tar_truncated"] >= 1 and bad["shard_unreadable"] >= 1 and bad["pipe_failed"] >= 2
    read = set(keys_of(batches))
    assert set(keys[:6]) <= read and read <= set(keys), "the good shard is read whole, the cut one in part"
    assert any(batch["bad_shards"].get("missing.tar") for batch in batches), "a pipe: shard is named by its object"


def test_bad_fraction_threshold_stops_with_the_worst_shards(tmp_path: Path) -> None:
    from megamm.train import TrainState, check_bad_fraction

    cfg = DataConfig(max_bad_fraction=0.1, bad_data_min_samples=100)
    state = TrainState(samples_seen=90, samples_skipped=50, bad_data={"image_corrupt": 50}, bad_shards={"a.tar": 50})
    check_bad_fraction(cfg, state)  # too few samples yet to judge
    state = TrainState(
        samples_seen=1000, samples_skipped=100, bad_data={"image_corrupt": 70, "tar_truncated": 30},
        bad_shards={"a.tar": 60, "b.tar": 30, "c.tar": 10},
    )  # fmt: skip
    check_bad_fraction(cfg, state)  # exactly at the threshold: goes on
    state.samples_skipped, state.bad_data["image_corrupt"] = 101, 71
    with pytest.raises(RuntimeError, match=r"101 of 1000 .*10\.1% > data\.max_bad_fraction=0\.1.*image_corrupt 71.*Worst shards: a\.tar \(60\), b\.tar \(30\), c\.tar \(10\)"):
        check_bad_fraction(cfg, state)
    assert bad_summary({"x": 1, "y": 5, "z": 5}, top=2) == "y (5), z (5)"


def test_next_epochs_restart_after_the_furthest_stream() -> None:
    streams = {0: {"sources": [{"epoch": 2}, {"epoch": 7}]}, 3: {"sources": [{"epoch": 4}, {"epoch": 1}]}}
    assert next_epochs(streams, 2) == [5, 8]
    assert initial_state(2, [5, 8])["sources"] == [{"epoch": 5, "next": 0, "open": []}, {"epoch": 8, "next": 0, "open": []}]


def test_source_config_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_uneven(tmp_path / "a", sizes=(4, 4))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight must be positive"):
        build_train_loader(cfg_for(tmp_path / "a", tokenizer, sources=[SourceConfig(shards=str(tmp_path / "a"), weight=0)]), tokenizer, 0, 1, 2)
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.index=.*does not list every shard"):
        build_train_loader(
            cfg_for(tmp_path / "a", tokenizer, sources=[
                SourceConfig(shards=str(tmp_path / "a")),
                SourceConfig(shards=f"pipe:cat {tmp_path}/a/shard-000000.tar", index=str(tmp_path / "none.json")),
            ]),
            tokenizer, 0, 1, 2,
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.sampling='sometimes' is not one of epochs, resample"):
        build_train_loader(cfg_for(tmp_path / "a", tokenizer, sampling="sometimes"), tokenizer, 0, 1, 2)
    assert os.path.exists(tmp_path / "a" / "sizes.json")


# ----------------------------------------------------------------------------------------------
# Modality pairs


def flac(seconds: float, rate: int = 44_100, channels: int = 2) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone] * channels, axis=1), rate, format="FLAC")
    return buffer.getvalue()


def test_any_trained_pair_makes_a_sample_usable(tmp_path: Path, tokenizer: Tokenizer) -> None:
    root = tmp_path / "pairs"
    root.mkdir()
    write_tar(root / "shard-000000.tar", [
        {"__key__": "image-text", "jpg": jpeg(1), "txt": b"sample red"},
        {"__key__": "audio-text", "flac": flac(0.5), "json": json.dumps({"captions": ["sample blue", "sample red"]}).encode()},
        {"__key__": "image-audio", "jpg": jpeg(2), "wav": encode_wav((3000 * np.sin(np.arange(8000) / 5)).astype(np.int16))},
        {"__key__": "image-only", "jpg": jpeg(3)},
        {"__key__": "vqa", "jpg": jpeg(4), "json": json.dumps({"question": "what colour?", "answers": ["red", "blue", "red"]}).encode()},
    ])  # fmt: skip
    cfg = cfg_for(root, tokenizer, eval_shards=str(root / "shard-000000.tar"))
    batch = next(iter_eval_batches(cfg, tokenizer, 8, extras=("audio", "qa")))
    assert batch["keys"] == ["image-text", "audio-text", "image-audio", "vqa"]
    assert batch["has_image"].tolist() == [True, False, True, True]
    assert batch["has_text"].tolist() == [True, True, False, False]
    assert batch["has_audio"].tolist() == [False, True, True, False]
    assert batch["audio_lengths"].tolist() == [0, 8000, 8000, 0], "44.1 kHz stereo FLAC -> 0.5 s at 16 kHz mono"
    assert abs(float(batch["audio"][1].abs().max()) - 0.3) < 0.01
    assert (batch["image"][1] == -1).all(), "a row without an image is black"
    assert batch["text_mask"][2].tolist() == [True] + [False] * (TEXT_LENGTH - 1), "BOS alone without a caption"
    assert batch["question_mask"][3].any() and batch["answer_mask"][3].any()  # "red": the most frequent answer
    assert batch["bad"] == {"caption_missing": 1}
    # A model that trains on image+text only: the audio+text and image+audio samples are bad.
    plain = next(iter_eval_batches(cfg, tokenizer, 8, extras=()))
    assert plain["keys"] == ["image-text"] and plain["bad"] == {"image_missing": 1, "caption_missing": 3}


# ----------------------------------------------------------------------------------------------
# The key check across model-parallel peers


def _key_check(rank: int, world: int) -> None:
    from megamm.data import keys_digest
    from megamm.parallel import ParallelState
    from megamm.train import check_same_keys

    parallel = ParallelState.initialize(tensor_parallel=world)
    same = [keys_digest(["a", "b"]), keys_digest(["c"])]
    check_same_keys(same, parallel, step=3)  # identical keys: passes
    differing = [keys_digest(["a", "b" if rank == 0 else "x"]), keys_digest(["c"])]
    with pytest.raises(RuntimeError, match=r"step 4: the tensor/pipeline-parallel peers of data-parallel rank 0 trained on different samples \(ranks \[1\] differ from rank 0\)"):
        check_same_keys(differing, parallel, step=4)


def test_model_parallel_peers_with_other_keys_are_caught(tmp_path: Path) -> None:
    from tests.distributed import run_distributed

    run_distributed(_key_check, 2, tmp_path, timeout=120)


def test_train_tokenizer_streams_captions_from_pipes_and_json(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_tokenizer as tool

    root = tmp_path / "text"
    root.mkdir()
    words = ["zebra", "quokka", "narwhal", "axolotl"]
    write_tar(root / "a.tar", [
        {"__key__": f"a{i}", "jpg": jpeg(i), "json": json.dumps({"captions": [f"a {w} swims" for w in words]}).encode()}
        for i in range(30)
    ])  # fmt: skip
    write_tar(root / "b.tar", [{"__key__": f"b{i}", "jpg": jpeg(i), "txt": b"an okapi grazes"} for i in range(30)])
    out = tmp_path / "tok" / "t.model"
    assert tool.main(["--shards", f"pipe:cat {root / 'a.tar'}", str(root / "b.tar"), "--out", str(out), "--vocab-size", "60"]) == 0
    tokenizer = Tokenizer(out)
    for word in [*words, "okapi"]:
        assert 1 not in tokenizer.pieces(f"a {word}"), f"{word} is not covered"  # 1: the unknown piece
    assert tool.main(["--shards", str(root / "missing.tar"), "--out", str(out)]) == 2


def test_resume_settings_streams_may_change_the_rest_may_not(tmp_path: Path, tokenizer: Tokenizer) -> None:
    from megamm.data import build_sources, data_stream_settings
    from megamm.preflight import _check_data_stream

    write_uneven(tmp_path / "d", sizes=(5, 5, 5, 5))
    cfg = cfg_for(tmp_path / "d", tokenizer, num_workers=2)
    saved = data_stream_settings(cfg, build_sources(cfg), dp_size=2)
    assert saved["streams"] == 4
    checkpoint = tmp_path / "global_step9"
    assert _check_data_stream(checkpoint, saved, dict(saved), restart_data=False) is None
    fewer = data_stream_settings(cfg, build_sources(cfg), dp_size=1)
    assert _check_data_stream(checkpoint, saved, fewer, restart_data=False) == 4, "another data-parallel size: epoch restart"
    reseeded = data_stream_settings(cfg_for(tmp_path / "d", tokenizer, num_workers=2, seed=5), build_sources(cfg), dp_size=2)
    with pytest.raises(ConfigError, match=r"another training data stream \(data\.seed changed: seed 11 -> 5\).*--restart-data"):
        _check_data_stream(checkpoint, saved, reseeded, restart_data=False)
    older = {"shards": 4, "shard_names_sha256": "x", "loader_workers": 2, "seed": 11, "shuffle_buffer": 8}
    with pytest.raises(ConfigError, match=r"the data position's format \(an older megamm saved it\)"):
        _check_data_stream(checkpoint, older, saved, restart_data=False)
    assert _check_data_stream(checkpoint, older, saved, restart_data=True) is None


def test_a_stream_without_usable_samples_fails_instead_of_hanging(tmp_path: Path, tokenizer: Tokenizer) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    write_tar(root / "shard-000000.tar", [{"__key__": f"b{i}", "jpg": jpeg(i)} for i in range(5)])  # no captions
    with pytest.raises(RuntimeError, match=r"data stream 0 \(dp rank 0\): its shards hold no usable samples .*caption_missing"):
        take(build_train_loader(cfg_for(root, tokenizer), tokenizer, 0, 1, 2), 1)
