"""tools/make_shards.py: folder, CSV, JSONL and COCO inputs to WebDataset shards and sizes.json.

The shards are read back with two independent readers (Python's tarfile and webdataset) and
compared with the inputs byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from megamm.data.audio import encode_wav
from tools import make_shards

REPO = Path(__file__).resolve().parents[1]

Expected = dict[str, dict[str, bytes]]
"""key -> {extension: member bytes}."""


# ----------------------------------------------------------------------------------------------
# Inputs


def png(seed: int, side: int = 4, noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8) if noise else \
        np.full((side, side, 3), seed % 256, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 30, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def webp(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, seed % 256, 60)).save(buffer, format="WEBP")
    return buffer.getvalue()


def wav(seed: int) -> bytes:
    return encode_wav(np.random.default_rng(seed).integers(-1000, 1000, 160, dtype=np.int16))


def flac(seed: int) -> bytes:
    buffer = io.BytesIO()
    samples = np.random.default_rng(seed).integers(-1000, 1000, 160, dtype=np.int16)
    soundfile.write(buffer, samples, 16000, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def put(root: Path, relative: str, data: bytes | str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def make_folder(root: Path) -> Expected:
    """A folder tree with good samples of every kind, bad ones and ignored files."""
    expected: Expected = {}
    put(root, "a/b/0001.jpg", jpeg(1))
    put(root, "a/b/0001.txt", "  a red box\n")
    put(root, "a/b/0001.flac", flac(1))
    expected["a/b/0001"] = {"jpg": jpeg(1), "flac": flac(1), "txt": b"a red box"}
    put(root, "a/b/0002.PNG", png(2))
    put(root, "a/b/0002.txt", "caf\u00e9 au lait")
    put(root, "a/b/0002.wav", wav(2))
    expected["a/b/0002"] = {"png": png(2), "wav": wav(2), "txt": "caf\u00e9 au lait".encode()}
    meta = json.dumps({"captions": ["one", "two"], "source": "x"}).encode()
    put(root, "c/0003.webp", webp(3))
    put(root, "c/0003.json", meta)
    expected["c/0003"] = {"webp": webp(3), "json": meta}
    put(root, "img.v2.png", png(4))  # a dotted stem
    put(root, "img.v2.txt", "dotted")
    expected["img_v2"] = {"png": png(4), "txt": b"dotted"}
    put(root, "d/0004.png", png(5))  # no caption
    put(root, "d/0005.png", png(6))
    put(root, "d/0005.txt", " \n")  # empty caption
    put(root, "d/0006.jpg", b"not a jpeg")  # undecodable
    put(root, "d/0006.txt", "broken")
    put(root, "e/0007.txt", "caption without media")
    put(root, "e/0008.wav", b"RIFF but not really")  # undecodable
    put(root, "e/0008.txt", "a broken sound")
    put(root, "f/0009.png", png(9))  # an image with its sound is a pair the loader trains on
    put(root, "f/0009.wav", wav(9))
    expected["f/0009"] = {"png": png(9), "wav": wav(9)}
    put(root, "f/0010.png", png(10))  # an image and an empty caption is bad, sound or not
    put(root, "f/0010.wav", wav(10))
    put(root, "f/0010.txt", "")
    long_stem = "long/" + "n" * 120  # a member name over 100 characters: a pax header
    put(root, f"{long_stem}.png", png(11))
    put(root, f"{long_stem}.txt", "a long name")
    expected[long_stem] = {"png": png(11), "txt": b"a long name"}
    put(root, "\u00fcber/bild.png", png(12))  # a non-ASCII name: a pax header
    put(root, "\u00fcber/bild.txt", "non-ASCII path")
    expected["\u00fcber/bild"] = {"png": png(12), "txt": b"non-ASCII path"}
    put(root, "g/0013.png", png(13))
    put(root, "g/0013.json", "[1, 2]")  # JSON, but not an object
    put(root, "notes.xyz", "ignored")
    put(root, "e/readme.md", "ignored")
    return expected


# ----------------------------------------------------------------------------------------------
# Running the tool and reading its output


def run(*argv: str | Path) -> int:
    return make_shards.main([str(a) for a in argv] + ["--quiet"])


def shard_paths(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]


def read_with_tarfile(out: Path) -> Expected:
    """Samples of every shard, grouped by key, checking every member's metadata on the way."""
    samples: Expected = {}
    for path in shard_paths(out):
        for info, data in tar_members(path):
            assert info.isreg() and info.mtime == 0 and info.mode == 0o644, info.name
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", ""), info.name
            directory, _, base = info.name.rpartition("/")
            stem, ext = base.split(".", 1)  # the layout: no dot in a key
            key = f"{directory}/{stem}" if directory else stem
            assert ext not in samples.get(key, {}), f"{info.name} twice"
            samples.setdefault(key, {})[ext] = data
    return samples


def read_with_webdataset(paths: list[Path]) -> list[dict[str, Any]]:
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    return [{k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")} for sample in dataset]


def sizes(out: Path) -> dict[str, int]:
    return json.loads((out / make_shards.SIZES_FILE).read_text())


def check_index(out: Path) -> None:
    """sizes.json names every shard and each count is the shard's real number of samples."""
    table = sizes(out)
    assert sorted(table) == [p.name for p in shard_paths(out)]
    for path in shard_paths(out):
        assert table[path.name] == len(read_with_webdataset([path]))


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def as_expected(samples: list[dict[str, Any]]) -> Expected:
    return {s["__key__"]: {k: v for k, v in s.items() if k != "__key__"} for s in samples}


# ----------------------------------------------------------------------------------------------
# Folder input


def test_folder_shards_match_the_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "3") == 0
    assert read_with_tarfile(out) == expected
    samples = read_with_webdataset(shard_paths(out))
    assert [s["__key__"] for s in samples] == sorted(expected)  # sorted by key, over shard order
    assert as_expected(samples) == expected
    assert sizes(out) == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    check_index(out)
    from megamm.data.shards import SIZES_FILE, known_sample_count  # the loader's reading of the index

    assert SIZES_FILE == make_shards.SIZES_FILE
    assert known_sample_count([str(p) for p in shard_paths(out)]) == len(expected)
    printed = capsys.readouterr()
    assert "ignored: 2 files with other extensions: .md (1) .xyz (1)" in printed.out
    summary = printed.out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote 3 shards, 7 samples, {sum(p.stat().st_size for p in shard_paths(out))} bytes")
    for reason in ("1 missing caption file", "2 empty caption", "1 undecodable image", "1 undecodable audio",
                   "1 missing image/audio file", "1 malformed json file"):
        assert reason in summary
    assert "skipped 7 samples" in summary
    assert "d/0006.jpg" in printed.err  # the warning names the file


def test_strict_fails_when_a_sample_was_skipped(tmp_path: Path) -> None:
    make_folder(tmp_path / "in")
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out", "--strict") == 1
    assert sum(sizes(tmp_path / "out").values()) == 7  # the good samples are written all the same
    put(tmp_path, "good/x.png", png(1))
    put(tmp_path, "good/x.txt", "fine")
    assert run("--from-folder", tmp_path / "good", "--out", tmp_path / "out2", "--strict") == 0


def test_unreadable_file_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path, "in/ok.png", png(1))
    put(tmp_path, "in/ok.txt", "ok")
    put(tmp_path, "in/locked.png", png(2))
    put(tmp_path, "in/locked.txt", "no access").chmod(0)
    if os.access(tmp_path / "in/locked.txt", os.R_OK):  # root reads anything: a symlink loop instead
        (tmp_path / "in/locked.txt").unlink()
        (tmp_path / "in/locked.txt").symlink_to("locked.txt")
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out") == 0
    assert list(read_with_tarfile(tmp_path / "out")) == ["ok"]
    assert "1 unreadable file" in capsys.readouterr().out


def test_dotted_stems_that_collide_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path, "in/x.y.png", png(1))
    put(tmp_path, "in/x.y.txt", "dotted")
    put(tmp_path, "in/x_y.png", png(2))
    put(tmp_path, "in/x_y.txt", "underscored")
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "duplicate key 'x_y'" in err and "x.y.png" in err and "x_y.png" in err
    assert not (tmp_path / "out").exists()


def test_two_images_of_one_stem_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path, "in/a/1.jpg", jpeg(1))
    put(tmp_path, "in/a/1.png", png(1))
    put(tmp_path, "in/a/1.txt", "which image?")
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "duplicate key 'a/1'" in err and "a/1.jpg" in err and "a/1.png" in err


# ----------------------------------------------------------------------------------------------
# Limits, determinism, parallelism


def many_samples(root: Path, count: int, noise_every: int = 0) -> Expected:
    """``count`` image-caption pairs; with ``noise_every``, some images are large (noise PNGs)."""
    expected: Expected = {}
    for i in range(count):
        side = 16 + (i * 7) % 40 if noise_every and i % noise_every == 0 else 4  # at most ~9 KB
        image = png(i, side, noise=side > 4)
        put(root, f"s{i:03d}.png", image)
        put(root, f"s{i:03d}.txt", f"caption number {i}")
        expected[f"s{i:03d}"] = {"png": image, "txt": f"caption number {i}".encode()}
    return expected


def test_max_samples(tmp_path: Path) -> None:
    expected = many_samples(tmp_path / "in", 23)
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out", "--max-samples", "5",
               "--prefix", "train") == 0
    assert list(sizes(tmp_path / "out").values()) == [5, 5, 5, 5, 3]
    assert list(sizes(tmp_path / "out")) == [f"train-{i:06d}.tar" for i in range(5)]
    check_index(tmp_path / "out")
    assert as_expected(read_with_webdataset(shard_paths(tmp_path / "out"))) == expected


def test_max_bytes(tmp_path: Path) -> None:
    expected = many_samples(tmp_path / "in", 40, noise_every=3)
    put(tmp_path, "in/s100.png", png(100, 80, noise=True))  # about 19 KB: larger than the limit
    put(tmp_path, "in/s100.txt", "too big for any shard")
    limit = 12 * 1024
    out = tmp_path / "out"
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-bytes", "12K", "--max-samples", "0") == 0
    check_index(out)
    lone = 0
    for path in shard_paths(out):
        if path.stat().st_size > limit:
            assert sizes(out)[path.name] == 1, f"{path.name} is over the limit with several samples"
            lone += 1
    assert lone == 1
    counts = list(sizes(out).values())
    assert len(counts) > 3 and sum(counts) == 41
    # Packing is greedy: each shard but the last would have gone over the limit with the next sample.
    paths = shard_paths(out)
    for path, following in zip(paths, paths[1:]):
        members = tar_members(following)
        first_key = members[0][0].name.split(".")[0]
        first_sample = sum(512 + -(-len(data) // 512) * 512 for info, data in members
                           if info.name.split(".")[0] == first_key)
        assert path.stat().st_size + first_sample > limit
    samples = read_with_webdataset(shard_paths(out))
    assert set(as_expected(samples)) == set(expected) | {"s100"}
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "out2", "--max-bytes", "12K",
               "--max-samples", "4") == 0
    assert max(sizes(tmp_path / "out2").values()) <= 4
    assert all(p.stat().st_size <= limit or sizes(tmp_path / "out2")[p.name] == 1
               for p in shard_paths(tmp_path / "out2"))


def test_workers_reruns_and_shuffle_give_identical_bytes(tmp_path: Path) -> None:
    expected = many_samples(tmp_path / "in", 30, noise_every=4)
    args = ["--from-folder", tmp_path / "in", "--max-samples", "4", "--max-bytes", "8K"]
    assert run(*args, "--out", tmp_path / "w1", "--workers", "1") == 0
    assert run(*args, "--out", tmp_path / "w2", "--workers", "2") == 0
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")
    assert run(*args, "--out", tmp_path / "w1", "--workers", "2", "--force") == 0
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")
    assert run(*args, "--out", tmp_path / "s1", "--shuffle", "--seed", "3") == 0
    assert run(*args, "--out", tmp_path / "s2", "--shuffle", "--seed", "3", "--workers", "1") == 0
    assert snapshot(tmp_path / "s1") == snapshot(tmp_path / "s2")
    shuffled = [s["__key__"] for s in read_with_webdataset(shard_paths(tmp_path / "s1"))]
    assert shuffled != sorted(shuffled) and sorted(shuffled) == sorted(expected)


def test_force_is_needed_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    many_samples(tmp_path / "in", 12)
    out = tmp_path / "out"
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "2") == 0
    before = snapshot(out)
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "5") == 2
    assert "--force" in capsys.readouterr().err
    assert snapshot(out) == before
    (out / "sizes.json").unlink()  # shards alone are refused too
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "5") == 2
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "5", "--force") == 0
    assert sizes(out) == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2}
    assert [p.name for p in shard_paths(out)] == list(sizes(out))  # the 4 extra old shards are gone
    assert "removed 3 shards of an earlier run" in capsys.readouterr().out
    put(out, "other-000000.tar", b"")  # a shard of another run, with another prefix
    assert run("--from-folder", tmp_path / "in", "--out", out, "--max-samples", "5", "--force") == 0
    assert (out / "other-000000.tar").exists()
    assert "other-000000.tar, which sizes.json does not list" in capsys.readouterr().err
    only_index = tmp_path / "index-only"
    only_index.mkdir()
    (only_index / "sizes.json").write_text("{}")
    assert run("--from-folder", tmp_path / "in", "--out", only_index) == 2


# ----------------------------------------------------------------------------------------------
# Manifests


def test_csv_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    put(data, "imgs/p1.png", png(1))
    put(data, "imgs/p2.jpg", jpeg(2))
    put(data, "imgs/p3.v1.png", png(3))
    put(data, "imgs/p4.png", png(4))
    put(data, "sounds/s1.wav", wav(1))
    outside = put(tmp_path, "elsewhere/far.png", png(9))
    rows = [
        {"image": "imgs/p1.png", "caption": "one caption"},
        {"image": "imgs/p2.jpg", "audio": "sounds/s1.wav", "captions": json.dumps(["first", " second "])},
        {"image": "imgs/p3.v1.png", "question": "what is it?", "answers": json.dumps(["a cat", "cat"])},
        {"image": "imgs/p4.png", "caption": "with a question", "question": "colour?", "answer": "red",
         "key": "custom/k.1"},
        {"audio": "sounds/s1.wav", "caption": "only a sound", "key": "sound-1"},
        {"image": str(outside), "caption": "an absolute path"},
        {"image": "imgs/missing.png", "caption": "gone"},
        {"image": "imgs/p1.png", "caption": "   ", "key": "blank"},
        {"image": "imgs/p1.png", "question": "unanswered?", "key": "unanswered"},
        {"caption": "no media", "key": "nomedia"},
        {"image": "imgs/p1.png", "captions": "not json", "key": "badlist"},
    ]
    manifest = data / "train.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["key", "image", "audio", "caption", "captions", "question",
                                         "answers", "answer", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert run("--from-manifest", manifest, "--out", out) == 0
    expected: Expected = {
        "imgs/p1": {"png": png(1), "txt": b"one caption"},
        "imgs/p2": {"jpg": jpeg(2), "wav": wav(1), "json": json.dumps({"captions": ["first", "second"]}).encode()},
        "imgs/p3_v1": {"png": png(3), "json": json.dumps({"question": "what is it?", "answers": ["a cat", "cat"]}).encode()},
        "custom/k_1": {"png": png(4), "json": json.dumps(
            {"captions": ["with a question"], "question": "colour?", "answers": ["red"]}).encode()},
        "sound-1": {"wav": wav(1), "txt": b"only a sound"},
        "far": {"png": png(9), "txt": b"an absolute path"},
    }
    assert read_with_tarfile(out) == expected
    assert as_expected(read_with_webdataset(shard_paths(out))) == expected
    check_index(out)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    for reason in ("1 missing image file", "1 empty caption", "1 question without answers",
                   "1 no image or audio", "1 malformed captions"):
        assert reason in summary
    assert "skipped 5 samples" in summary


def test_csv_manifest_with_root(tmp_path: Path) -> None:
    put(tmp_path, "media/x.png", png(1))
    manifest = put(tmp_path, "lists/m.csv", "image,caption\nx.png,hello\n")
    assert run("--from-manifest", manifest, "--root", tmp_path / "media", "--out", tmp_path / "out") == 0
    assert read_with_tarfile(tmp_path / "out") == {"x": {"png": png(1), "txt": b"hello"}}


def test_jsonl_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    put(tmp_path, "a.png", png(1))
    put(tmp_path, "b.flac", flac(2))
    lines = [
        json.dumps({"image": "a.png", "key": "a-q1", "question": "shape?", "answers": ["round"],
                    "captions": ["a disc", "a circle"]}),
        json.dumps({"image": "a.png", "key": "a-q2", "question": "colour?", "answer": "grey"}),
        json.dumps({"audio": "b.flac", "captions": ["a beep"]}),
        "{not json",
        json.dumps({"image": "a.png", "captions": "not a list", "key": "bad"}),
        "",
    ]
    manifest = put(tmp_path, "m.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run("--from-manifest", manifest, "--out", out) == 0
    expected: Expected = {
        "a-q1": {"png": png(1), "json": json.dumps(
            {"captions": ["a disc", "a circle"], "question": "shape?", "answers": ["round"]}).encode()},
        "a-q2": {"png": png(1), "json": json.dumps({"question": "colour?", "answers": ["grey"]}).encode()},
        "b": {"flac": flac(2), "txt": b"a beep"},
    }
    assert as_expected(read_with_webdataset(shard_paths(out))) == expected
    assert read_with_tarfile(out) == expected
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 malformed manifest row" in summary and "1 malformed captions" in summary

    duplicated = put(tmp_path, "dup.jsonl", "\n".join([
        json.dumps({"image": "a.png", "question": "shape?", "answer": "round"}),
        json.dumps({"image": "a.png", "question": "colour?", "answer": "grey"}),
    ]))
    assert run("--from-manifest", duplicated, "--out", tmp_path / "dup") == 2
    err = capsys.readouterr().err
    assert "duplicate key 'a'" in err and "dup.jsonl line 1" in err and "dup.jsonl line 2" in err


def test_unreadable_manifest_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    assert run("--from-manifest", missing, "--out", tmp_path / "out") == 2
    assert str(missing) in capsys.readouterr().err
    put(tmp_path, "bad.csv", b"image,caption\n\xff\xfe,x\n")
    assert run("--from-manifest", tmp_path / "bad.csv", "--out", tmp_path / "out") == 2
    assert "bad.csv" in capsys.readouterr().err
    put(tmp_path, "headless.csv", "a.png,caption\n")
    assert run("--from-manifest", tmp_path / "headless.csv", "--out", tmp_path / "out") == 2
    assert "header row" in capsys.readouterr().err
    put(tmp_path, "m.txt", "")
    assert run("--from-manifest", tmp_path / "m.txt", "--out", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# COCO


def test_coco_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "val2014"
    put(images, "COCO_val2014_000000000001.jpg", jpeg(1))
    put(images, "COCO_val2014_000000000002.jpg", jpeg(2))
    put(images, "COCO_val2014_000000000004.jpg", jpeg(4))
    coco = {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg"},  # no file
            {"id": 4, "file_name": "COCO_val2014_000000000004.jpg"},  # no caption
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man riding a horse."},
            {"id": 11, "image_id": 2, "caption": "A plate of food."},
            {"id": 12, "image_id": 1, "caption": "Someone on horseback. "},
            {"id": 13, "image_id": 3, "caption": "Lost."},
            {"id": 14, "image_id": 99, "caption": "Nobody's."},
        ],
    }
    captions = put(tmp_path, "annotations/captions_val2014.json", json.dumps(coco))
    out = tmp_path / "out"
    assert run("--from-coco", captions, "--images", images, "--out", out) == 0
    expected: Expected = {
        "COCO_val2014_000000000001": {"jpg": jpeg(1), "json": json.dumps(
            {"captions": ["A man riding a horse.", "Someone on horseback."]}).encode()},
        "COCO_val2014_000000000002": {"jpg": jpeg(2), "txt": b"A plate of food."},
    }
    assert read_with_tarfile(out) == expected
    assert as_expected(read_with_webdataset(shard_paths(out))) == expected
    printed = capsys.readouterr().out
    assert "1 annotations of unknown image ids" in printed
    assert "1 missing image file" in printed and "1 no caption or question" in printed

    assert run("--from-coco", captions, "--images", tmp_path / "no-such-dir", "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "--images" in err and "no-such-dir" in err
    assert run("--from-coco", captions, "--out", tmp_path / "o3") == 2  # --images is required
    put(tmp_path, "broken.json", "{")
    assert run("--from-coco", tmp_path / "broken.json", "--images", images, "--out", tmp_path / "o4") == 2
    assert "broken.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The command line


def test_command_line_matches_in_process_run(tmp_path: Path) -> None:
    expected = make_folder(tmp_path / "in")
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "inproc", "--max-samples", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), "--from-folder", str(tmp_path / "in"),
         "--out", str(tmp_path / "cli"), "--max-samples", "2", "--workers", "2"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("wrote 4 shards, 7 samples")
    assert "writing" in done.stderr  # the progress bars go to stderr
    assert snapshot(tmp_path / "cli") == snapshot(tmp_path / "inproc")
    assert as_expected(read_with_webdataset(shard_paths(tmp_path / "cli"))) == expected


def test_argument_errors(tmp_path: Path) -> None:
    put(tmp_path, "in/x.png", png(1))
    put(tmp_path, "in/x.txt", "x")
    base = ["--from-folder", tmp_path / "in", "--out", tmp_path / "out"]
    assert run(*base, "--max-bytes", "lots") == 2
    assert run(*base, "--max-samples", "0") == 2  # no limit at all
    assert run(*base, "--workers", "0") == 2
    assert run(*base, "--from-manifest", tmp_path / "m.csv") == 2  # two inputs
    assert run("--out", tmp_path / "out") == 2  # no input
    assert not (tmp_path / "out").exists()
    assert run("--from-folder", tmp_path / "empty-in", "--out", tmp_path / "out") == 2
    assert run("--from-folder", tmp_path / "in", "--out", tmp_path / "in") == 2
    inside = tmp_path / "in" / "shards"  # an output folder inside the input is not read as input
    assert run("--from-folder", tmp_path / "in", "--out", inside) == 0
    assert run("--from-folder", tmp_path / "in", "--out", inside, "--force") == 0
    assert sizes(inside) == {"shard-000000.tar": 1}
    (tmp_path / "nothing").mkdir()
    assert run("--from-folder", tmp_path / "nothing", "--out", tmp_path / "out") == 1  # no samples
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a/b/0001.jpg", "x" * 100 + ".png", "y" * 101 + ".png", "caf\u00e9.txt"])
@pytest.mark.parametrize("size", [0, 1, 512, 513])
def test_member_size_estimate_is_exact(name: str, size: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BytesIO(b"x" * size))
        written = tar.offset
    member = make_shards.Member(name, size, data=b"x" * size)
    assert make_shards._member_bytes(member) == written


@pytest.mark.parametrize("text, value", [
    ("1000", 1000), ("64K", 65536), ("500M", 500 * 2**20), ("1G", 2**30), ("1.5g", 3 * 2**29), ("2MiB", 2 * 2**20),
])
def test_parse_size(text: str, value: int) -> None:
    assert make_shards.parse_size(text) == value
