"""tools/inspect_shards.py: shards built here with known good and bad samples are counted right.

Every kind of bad data the loader knows is built in (a corrupt image, an empty caption, broken
JSON, a missing caption, undecodable audio, a sample without a usable pair, a repeated member, a
truncated tar, a file that is not a tar, a failing ``pipe:`` command, a wrong ``sizes.json``), and
the tool's counts are checked against those built in, in process (``main``) and as a subprocess
(exit status, the JSON last line, the human report naming the reasons).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from megamm.data.audio import encode_wav
from tools import inspect_shards

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "inspect_shards.py"

Sample = tuple[str, list[tuple[str, bytes]]]
"""(key, [(extension, member bytes), ...]) in member order."""


# ----------------------------------------------------------------------------------------------
# Inputs


def png(size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def wav(seconds: float) -> bytes:
    samples = int(seconds * 16_000)
    return encode_wav(np.random.default_rng(0).integers(-1000, 1000, samples, dtype=np.int16))


def flac(seconds: float) -> bytes:
    buffer = io.BytesIO()
    samples = int(seconds * 16_000)
    soundfile.write(buffer, np.random.default_rng(1).uniform(-0.1, 0.1, samples), 16_000, format="FLAC")
    return buffer.getvalue()


def text(value: str) -> bytes:
    return value.encode("utf-8")


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def tar_bytes(samples: list[Sample]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: Path, samples: list[Sample]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(samples))
    return path


def write_sizes(directory: Path, sizes: dict[str, int]) -> None:
    (directory / "sizes.json").write_text(json.dumps(sizes))


def good_samples() -> tuple[list[Sample], list[Sample]]:
    """Two shards of usable samples (for the tiny recipe: audio and questions read); key a0 is in both."""
    first = [
        ("a0", [("png", png((8, 6))), ("txt", text("a red box"))]),
        ("a1", [("jpg", jpg((16, 16))), ("json", as_json({"caption": "two words"}))]),
        ("a2", [("png", png()), ("wav", wav(0.5)), ("txt", text("beep"))]),
        ("a3", [("png", png((12, 10))), ("flac", flac(1.5)), ("json", as_json({"captions": ["x y z", "w"]}))]),
        ("a4", [("png", png()), ("json", as_json({"question": "what colour?", "answers": ["red", "red", "blue"],
                                                  "caption": "a thing"}))]),
        ("a5", [("flac", flac(0.25)), ("txt", text("audio only"))]),
    ]
    second = [
        ("a0", [("png", png()), ("txt", text("the same key again"))]),
        ("b1", [("png", png()), ("txt", text("one more caption of six"))]),
    ]
    return first, second


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test shards, and the counts built into them."""
    root = tmp_path_factory.mktemp("shards")

    good = root / "good"
    first, second = good_samples()
    write_tar(good / "shard-000000.tar", first)
    write_tar(good / "shard-000001.tar", second)
    write_sizes(good, {"shard-000000.tar": 6, "shard-000001.tar": 2})

    bad = root / "bad"
    mixed: list[Sample] = [
        ("g0", [("png", png()), ("txt", text("fine"))]),
        ("g1", [("jpg", jpg()), ("txt", text("also fine"))]),
        ("c0", [("png", b"this is not an image"), ("txt", text("corrupt image"))]),
        ("e0", [("png", png()), ("txt", text("   "))]),
        ("j0", [("png", png()), ("json", b"{not json")]),
        ("m0", [("png", png())]),
        ("u0", [("png", png()), ("txt", text("junk audio")), ("wav", b"RIFF\x00\x00junk not audio")]),
        ("n0", [("txt", text("text alone"))]),
        ("d0", [("png", png()), ("png", png()), ("txt", text("twice"))]),
    ]
    write_tar(bad / "mixed.tar", mixed)
    whole = tar_bytes([(f"t{i}", [("png", png()), ("txt", text(f"caption {i}"))]) for i in range(4)])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        third_image = tar.getmembers()[4]  # t2.png
    (bad / "truncated.tar").write_bytes(whole[: third_image.offset_data + 10])
    (bad / "notatar.tar").write_bytes(b"definitely not a tar file\n" * 40)
    write_sizes(bad, {"mixed.tar": 9, "truncated.tar": 4})
    bad_counts = {
        "image_corrupt": 1, "caption_empty": 1, "json_invalid": 1, "caption_missing": 1, "audio_undecodable": 1,
        "no_usable_pair": 1, "duplicate_member": 1,
        "tar_truncated": 2,  # the index says 4, two were read
        "shard_unreadable": 1, "pipe_failed": 1,  # not in an index: counted once
    }  # fmt: skip

    gnu_source = root / "gnu_source"
    (gnu_source / "sub").mkdir(parents=True)
    (gnu_source / "k0.png").write_bytes(png())
    (gnu_source / "k0.txt").write_text("from plain tar")
    (gnu_source / "k1.jpg").write_bytes(jpg())
    (gnu_source / "k1.txt").write_text("another one")
    (gnu_source / "sub" / "k2.png").write_bytes(png((20, 4)))
    (gnu_source / "sub" / "k2.txt").write_text("in a folder")
    gnu = root / "gnu"
    gnu.mkdir()
    tar_program = shutil.which("tar")
    if tar_program is not None:
        # --sort=name keeps a sample's files together (without it, tar writes them in directory order)
        made = subprocess.run([tar_program, "--sort=name", "-cf", str(gnu / "plain.tar"), "-C", str(gnu_source), "."],
                              capture_output=True)
        if made.returncode == 0:
            write_sizes(gnu, {"plain.tar": 3})

    wrong = root / "wrong"
    write_tar(wrong / "shard-000001.tar", second)
    write_sizes(wrong, {"shard-000001.tar": 5})

    return {"root": root, "good": good, "bad": bad, "gnu": gnu, "wrong": wrong, "bad_counts": bad_counts}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict[str, Any] | None]:
    """(exit status, stdout, the JSON last line or None) of ``main(argv)``."""
    code = inspect_shards.main([*argv, "--quiet"])
    out = capsys.readouterr().out
    last = out.rstrip("\n").splitlines()[-1] if out.strip() else ""
    return code, out, json.loads(last) if "--json" in argv and last.startswith("{") else None


# ----------------------------------------------------------------------------------------------
# Good data


def test_good_shards_exit_0_with_statistics(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, summary = run_main([str(shards["good"]), "--json"], capsys)
    assert code == 0, out
    assert summary is not None
    assert summary["good"] == 8 and summary["bad"] == {} and summary["samples"] == 8 and summary["lost"] == 0
    assert summary["shards"] == 2 and summary["shard_problems"] == [] and summary["index_mismatches"] == []
    assert summary["extensions"] == {"png": 6, "txt": 5, "json": 3, "flac": 2, "jpg": 1, "wav": 1}
    assert list(summary["extensions"]) == ["png", "txt", "json", "flac", "jpg", "wav"]  # most frequent first
    assert summary["duplicate_keys"]["count"] == 1 and summary["duplicate_keys"]["within_shards"] == 0
    assert summary["duplicate_keys"]["examples"] == [{"key": "a0", "shards": ["shard-000000.tar", "shard-000001.tar"]}]
    assert summary["image_sizes"] == {"count": 7, "min": [8, 6], "median": [8, 6], "max": [16, 16]}
    # captions: a red box, two words, beep, x y z, w, a thing, audio only, the same key again, one more caption of six
    assert summary["caption_words"] == {"count": 9, "min": 1, "median": 2, "max": 5}
    audio = summary["audio_seconds"]
    assert audio["count"] == 3 and audio["min"] == pytest.approx(0.25) and audio["max"] == pytest.approx(1.5)
    assert audio["median"] == pytest.approx(0.5)
    assert summary["questions"] == 1
    assert summary["decoder"] == {"image_size": 32, "max_audio_seconds": 1.0, "seed": 1234, "extras": ["audio", "qa"],
                                  "pairs": ["image_text", "audio_text", "image_audio"]}
    assert [example["key"] for example in summary["examples"]] == ["a0", "a1", "a2"]
    assert summary["examples"][0]["image"] == [32, 32, 3] and summary["examples"][2]["audio_seconds"] == pytest.approx(0.5)
    assert summary["exit"] == 0
    assert "OK: all 8 samples are usable" in out
    assert "extensions: png 6, txt 5, json 3, flac 2, jpg 1, wav 1" in out
    assert "duplicate keys: 1 keys occur more than once (e.g. 'a0' in shard-000000.tar, shard-000001.tar)" in out
    assert "image size (width x height, by pixels): min 8x6, median 8x6, max 16x16 (7 images)" in out
    assert "samples with questions: 1" in out
    assert "decoded samples:" in out and "'a4'" not in out  # three shown by default


def test_flags_change_the_decoder(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    # without audio, the audio-only sample a5 has no usable pair; without questions a4 still has its caption
    code, out, summary = run_main([str(shards["good"]), "--no-audio", "--no-questions", "--image-size", "64",
                                   "--samples", "1", "--json"], capsys)
    assert code == 1 and summary is not None
    assert summary["good"] == 7 and summary["bad"] == {"image_missing": 1}
    assert summary["bad_examples"]["image_missing"]["key"] == "a5"
    assert summary["decoder"]["extras"] == [] and summary["decoder"]["pairs"] == ["image_text"]
    assert summary["examples"] == [{"shard": "shard-000000.tar", "key": "a0", "caption": "a red box", "question": None,
                                    "answer": None, "image": [64, 64, 3], "audio_seconds": None}]
    assert "image_missing" in out
    # a recipe without audio, audio turned back on: every pair counts (the decoder's default)
    code, _, summary = run_main([str(shards["good"]), "--config", "clip_tiny", "--audio", "--json"], capsys)
    assert code == 0 and summary is not None and summary["good"] == 8
    assert summary["decoder"]["pairs"] == ["image_text", "audio_text", "image_audio"]
    # only image-text pairs: the audio-only sample is bad; overrides after --config, the spec after them
    code, _, summary = run_main(["--config", "tiny", "data.seed=7", str(shards["good"]), "--pairs", "image_text",
                                 "--max-audio-seconds", "0.3", "--samples", "3", "--json"], capsys)
    assert code == 1 and summary is not None
    assert summary["bad"] == {"image_missing": 1} and summary["decoder"]["seed"] == 7
    assert summary["decoder"]["max_audio_seconds"] == pytest.approx(0.3)
    assert summary["examples"][2]["audio_seconds"] == pytest.approx(0.3)  # a2's half second, cut as training cuts it


def test_gnu_tar_shard(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    if not (shards["gnu"] / "plain.tar").is_file():
        pytest.skip("needs GNU tar (tar --sort=name)")
    with tarfile.open(shards["gnu"] / "plain.tar") as tar:
        names = tar.getnames()
    assert "." in names and "./k0.png" in names and "./sub" in names  # what plain tar writes
    code, out, summary = run_main([str(shards["gnu"] / "plain.tar"), "--json"], capsys)
    assert code == 0, out
    assert summary is not None and summary["good"] == 3 and summary["bad"] == {} and summary["index_mismatches"] == []
    assert {example["key"] for example in summary["examples"]} == {"k0", "k1", "sub/k2"}
    assert summary["image_sizes"] == {"count": 3, "min": [8, 6], "median": [20, 4], "max": [16, 16]}


def test_members_apart_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shard whose sample members are not consecutive (what tar writes in directory order)."""
    shard = write_tar(tmp_path / "apart.tar", [("k0", [("png", png())]), ("k1", [("png", png())]),
                                                ("k0", [("txt", text("zero"))]), ("k1", [("txt", text("one"))])])
    code, out, summary = run_main([str(shard), "--json"], capsys)
    assert code == 1 and summary is not None
    assert summary["good"] == 0 and summary["bad"] == {"caption_missing": 2, "no_usable_pair": 2}
    assert summary["duplicate_keys"]["count"] == 2 and summary["duplicate_keys"]["within_shards"] == 2
    assert "--sort=name" in out and "no usable sample" in out


# ----------------------------------------------------------------------------------------------
# Bad data


def test_empty_tar_has_no_usable_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = write_tar(tmp_path / "empty.tar", [])
    code, out, summary = run_main([str(shard), "--json"], capsys)
    assert code == 1 and summary is not None and summary["good"] == 0 and summary["samples"] == 0
    assert summary["bad"] == {} and "PROBLEM: the shards hold no samples" in out


def bad_specs(shards: dict[str, Any]) -> list[str]:
    return [str(shards["bad"]), "pipe:false"]


def test_bad_shards_counted_by_reason(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, summary = run_main([*bad_specs(shards), "--json"], capsys)
    assert code == 1
    assert summary is not None
    assert summary["bad"] == shards["bad_counts"]
    assert summary["good"] == 4 and summary["samples"] == 11 and summary["lost"] == 4
    assert summary["good"] + sum(summary["bad"].values()) == summary["samples"] + summary["lost"]
    assert summary["shards"] == 4
    problems = {Path(p["shard"]).name if not p["shard"].startswith("pipe:") else p["shard"]: p
                for p in summary["shard_problems"]}
    assert set(problems) == {"mixed.tar", "truncated.tar", "notatar.tar", "pipe:false"}
    assert problems["truncated.tar"]["error"] == "tar_truncated" and problems["truncated.tar"]["samples"] == 2
    assert problems["truncated.tar"]["good"] == 2 and problems["truncated.tar"]["bad"] == {"tar_truncated": 2}
    assert problems["notatar.tar"]["error"] == "shard_unreadable" and problems["pipe:false"]["error"] == "pipe_failed"
    assert problems["mixed.tar"]["error"] is None and problems["mixed.tar"]["good"] == 2
    assert summary["index_mismatches"] == []  # mixed.tar matches; truncated.tar ended early, so is not compared
    assert [Path(p).name for p in summary["index_missing"]] == ["notatar.tar"]
    examples = summary["bad_examples"]
    assert examples["image_corrupt"]["key"] == "c0" and examples["caption_empty"]["key"] == "e0"
    assert examples["duplicate_member"]["key"] == "d0" and examples["tar_truncated"]["key"] is None
    for reason in shards["bad_counts"]:
        assert reason in out
    assert "shards with problems:" in out and "PROBLEM: 11 bad samples" in out
    assert "e.g. mixed.tar 'c0'" in out


def test_workers_give_the_same_result(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    _, out_one, one = run_main([*bad_specs(shards), str(shards["good"]), "--json"], capsys)
    _, out_two, two = run_main([*bad_specs(shards), str(shards["good"]), "--json", "--workers", "3"], capsys)
    assert one is not None and one == two and out_one == out_two
    assert one["good"] == 12 and one["shards"] == 6


def test_wrong_index_is_a_problem(shards: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, summary = run_main([str(shards["wrong"]), "--json"], capsys)
    assert code == 1 and summary is not None
    assert summary["good"] == 2 and summary["bad"] == {}
    assert len(summary["index_mismatches"]) == 1
    mismatch = summary["index_mismatches"][0]
    assert Path(mismatch["shard"]).name == "shard-000001.tar" and mismatch["index"] == 5 and mismatch["actual"] == 2
    assert "index mismatch" in out and "the index says 5 samples, the shard holds 2" in out
    # --index names the table for every shard, pipe: ones included
    table = shards["root"] / "pipe_sizes.json"
    table.write_text(json.dumps({"shard-000001.tar": 2}))
    command = f"pipe:cat {shards['wrong'] / 'shard-000001.tar'}"
    code, _, summary = run_main([command, "--index", str(table), "--json"], capsys)
    assert code == 0 and summary is not None and summary["good"] == 2 and summary["index_mismatches"] == []


# ----------------------------------------------------------------------------------------------
# The command line


def test_subprocess_json_last_line_and_exit_status(shards: dict[str, Any]) -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), *bad_specs(shards), "--json", "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    summary = json.loads(lines[-1])
    assert summary["good"] == 4 and summary["bad"] == shards["bad_counts"]
    assert "PROBLEM:" in result.stdout and "tar_truncated" in result.stdout and "pipe_failed" in result.stdout
    assert "inspecting" in result.stderr  # the progress bar goes to stderr
    assert "notatar.tar" in result.stderr  # and so do the warnings about shards


@pytest.mark.parametrize("argv, message", [
    (["{root}/nothing-here-*.tar"], "matched no files"),
    (["{root}/missing.tar"], "does not exist"),
    ([], "give at least one SPEC"),
    (["{root}/good", "--workers", "0"], "--workers"),
    (["{root}/good", "--pairs", "image_smell"], "--pairs"),
    (["{root}/good", "--no-audio", "--pairs", "audio_text"], "needs audio"),
    (["{root}/good", "--config", "no_such_recipe"], "no recipe named"),
    (["{root}/good", "--config", "tiny", "data.nonsense=1"], "nonsense"),
    (["{root}/good", "--max-audio-seconds", "0.25"], "multiple of 0.1"),
    (["{root}/good", "--index", "{root}/no-such-sizes.json"], "--index"),
])  # fmt: skip
def test_usage_errors_exit_2(shards: dict[str, Any], capsys: pytest.CaptureFixture[str], argv: list[str],
                             message: str) -> None:
    code = inspect_shards.main([arg.format(root=shards["root"]) for arg in argv])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert captured.out == ""


def test_subprocess_usage_error(shards: dict[str, Any]) -> None:
    result = subprocess.run([sys.executable, str(TOOL), str(shards["root"] / "none-{0..3}.tar"), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and result.stdout == ""
