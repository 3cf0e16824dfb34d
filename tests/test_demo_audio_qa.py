"""Audio and question-answer pairs: WAV files, the demo's sounds and questions, and their batches.

Expectations come from independent references: WAV bytes read and written with the standard
library's ``wave``, an FFT and an energy envelope for the sounds, hand-written attribute tables,
and a separately loaded SentencePiece model for the token ids.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
import torch
import webdataset as wds
from PIL import Image

from megamm.config import DataConfig
from megamm.data import (
    ANSWER_VOCAB,
    DataPosition,
    Tokenizer,
    WavError,
    build_train_loader,
    decode_wav,
    encode_wav,
    iter_captions,
    iter_eval_batches,
    placeholder_batch,
    train_tokenizer,
    write_demo_dataset,
)

IMAGE_SIZE = 16
TEXT_LENGTH = 24
RATE = 16_000

# Reference tables, written independently of megamm.data.demo.
COLOUR_ORDER = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
PITCH = {colour: 250.0 * 2 ** (k / 2) for k, colour in enumerate(COLOUR_ORDER)}  # a tritone apart
BEEP_COUNT = {"circle": 1, "square": 2, "triangle": 3, "cross": 4}
SIZE_DB = {"small": (-13.5, -9.5), "medium": (-10.5, -3.5), "large": (-4.5, -0.5)}  # beep level, dBFS


def level_of_scale(scale: float) -> float:
    """The beeps' peak level in dBFS for a drawn scale in [0.8, 1.2]: -13 dBFS to -1 dBFS."""
    return -7.0 + 30.0 * (scale - 1.0)
SHAPE_SYNONYMS = ("circle", "disc", "round dot", "square", "box", "triangle", "cross", "plus sign")
PLACE_WORDS = ("left", "right", "top", "bottom", "center", "middle", "upper", "lower")
ANSWERS = (*COLOUR_ORDER, "circle", "square", "triangle", "cross", "left", "right", "top", "bottom",
           "center", "small", "medium", "large")


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


def all_members(root: Path) -> dict[str, dict[str, bytes]]:
    members: dict[str, dict[str, bytes]] = {}
    for path in sorted(root.rglob("*.tar")):
        members.update(tar_members(path))
    return members


def read_wav(data: bytes) -> np.ndarray:
    """(S,) float64 in [-1, 1), read with the standard library."""
    with wave.open(io.BytesIO(data)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, RATE)
        return np.frombuffer(reader.readframes(reader.getnframes()), "<i2") / 32768.0


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seed: int, samples: int = 4000) -> bytes:
    pcm = np.random.default_rng(seed).integers(-3000, 3000, samples, dtype=np.int16)
    return encode_wav(pcm)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_av")
    write_demo_dataset(root, train_shards=2, samples_per_shard=48, eval_samples=40,
                       image_size=IMAGE_SIZE, seed=5, workers=1)
    texts = iter_captions(sorted((root / "train").glob("*.tar")), include_questions=True)
    train_tokenizer(texts, root / "tokenizer.model", 160)
    return root


@pytest.fixture(scope="module")
def tokenizer(demo: Path) -> Tokenizer:
    return Tokenizer(demo / "tokenizer.model")


def data_cfg(root: Path, **overrides: Any) -> DataConfig:
    settings: dict[str, Any] = dict(
        train_shards=str(root / "train"), eval_shards=str(root / "eval"),
        tokenizer=str(root / "tokenizer.model"), image_size=IMAGE_SIZE, max_text_length=TEXT_LENGTH,
        num_workers=0, shuffle_buffer=16, seed=7,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def take(loader: Any, count: int) -> list[dict[str, Any]]:
    return list(itertools.islice(iter(loader), count))


# ----------------------------------------------------------------------------------------------
# WAV files


def test_wav_round_trip_is_exact() -> None:
    pcm = np.concatenate([np.array([-32768, -1, 0, 1, 32767], dtype=np.int16),
                          np.random.default_rng(0).integers(-32768, 32767, 5000, dtype=np.int16)])
    data = encode_wav(pcm)
    with wave.open(io.BytesIO(data)) as reader:  # what the standard library reads back
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, RATE)
        assert np.array_equal(np.frombuffer(reader.readframes(reader.getnframes()), "<i2"), pcm)
    decoded = decode_wav(data)
    assert decoded.dtype == np.int16 and np.array_equal(decoded, pcm)

    stereo = io.BytesIO()  # written by the standard library: channels are averaged
    with wave.open(stereo, "wb") as writer:
        writer.setnchannels(2), writer.setsampwidth(2), writer.setframerate(RATE)
        writer.writeframes(np.array([100, 300, -5, -6, 7, 7], dtype="<i2").tobytes())
    assert decode_wav(stereo.getvalue()).tolist() == [200, -6, 7]  # -5.5 rounds to even


def test_wav_decoder_rejects_corrupt_files() -> None:
    good = wav_bytes(1)
    other_rate = io.BytesIO()
    with wave.open(other_rate, "wb") as writer:
        writer.setnchannels(1), writer.setsampwidth(2), writer.setframerate(44_100)
        writer.writeframes(b"\0\0" * 10)
    eight_bit = io.BytesIO()
    with wave.open(eight_bit, "wb") as writer:
        writer.setnchannels(1), writer.setsampwidth(1), writer.setframerate(RATE)
        writer.writeframes(b"\x80" * 10)
    cases = {
        "not a PCM WAV": b"this is not a wav file",
        "not a PCM WAV ": good[:30],  # cut inside the header
        "truncated": good[: len(good) - 1001],  # the header promises more samples than follow
        "44100 Hz": other_rate.getvalue(),
        "8-bit": eight_bit.getvalue(),
        "no samples": encode_wav(np.zeros(0, dtype=np.int16)),
    }
    for expected, data in cases.items():
        with pytest.raises(WavError, match=expected.strip()):
            decode_wav(data)


# ----------------------------------------------------------------------------------------------
# The demo's sounds and questions


def dominant_pitch(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[spectrum.argmax()])


def beep_count(x: np.ndarray) -> int:
    envelope = np.sqrt(np.convolve(x**2, np.ones(80) / 80, mode="same"))  # 5 ms RMS
    on = envelope > 0.5 * envelope.max()
    return int(np.sum(on[1:] & ~on[:-1]) + on[0])


def beep_level(x: np.ndarray) -> float:
    """Peak level (dBFS) of the sine beeps: sqrt(2) x their RMS, where the envelope is high."""
    envelope = np.sqrt(np.convolve(x**2, np.ones(80) / 80, mode="same"))
    on = envelope > 0.7 * envelope.max()
    return float(20 * np.log10(np.sqrt(2 * np.mean(x[on] ** 2))))


def pitch_track(x: np.ndarray) -> np.ndarray:
    """Semitone pitch of each 25 ms frame (10 ms hop) that sounds, in time order."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
    spectra = np.abs(np.fft.rfft(frames, n=4096, axis=1))
    loud = np.sqrt(np.mean(frames**2, axis=1)) > 0.3 * np.sqrt(np.mean(frames**2, axis=1)).max()
    return 12 * np.log2(np.fft.rfftfreq(4096, 1 / RATE)[1:][spectra[loud, 1:].argmax(axis=1)])


def test_demo_sounds_encode_the_attributes(demo: Path) -> None:
    samples = all_members(demo)
    sounds = {key: sample for key, sample in samples.items() if "wav" in sample}
    assert len(sounds) >= 60
    pitches_by_colour: dict[str, list[float]] = {}
    for key, sample in sounds.items():
        attributes = json.loads(sample["json"])
        x = read_wav(sample["wav"])
        assert 0.4 * RATE <= len(x) <= 0.6 * RATE
        pitch = dominant_pitch(x)
        assert min(PITCH, key=lambda c: abs(np.log(pitch / PITCH[c]))) == attributes["colour"], key
        pitches_by_colour.setdefault(attributes["colour"], []).append(pitch)
        assert beep_count(x) == BEEP_COUNT[attributes["shape"]], key
        level = beep_level(x)
        low, high = SIZE_DB[attributes["size"]]
        assert low <= level <= high and abs(level - level_of_scale(attributes["scale"])) < 0.6, key
        track = pitch_track(x)
        third = len(track) // 3
        glide = np.median(track[-third:]) - np.median(track[:third])
        if attributes["position"] == "top":
            assert glide > 1, key  # rising, -2 -> +2 semitones over the clip
        elif attributes["position"] == "bottom":
            assert glide < -1, key  # falling
        elif attributes["position"] == "center":
            assert np.ptp(track) < 1, key  # steady
        assert attributes["audio"]["beeps"] == BEEP_COUNT[attributes["shape"]]
    assert set(pitches_by_colour) == set(COLOUR_ORDER)
    # different colours are far apart: every colour's pitches lie within 2.5 semitones of its own
    for colour, pitches in pitches_by_colour.items():
        assert np.all(np.abs(12 * np.log2(np.array(pitches) / PITCH[colour])) < 2.5), colour


def test_audio_fraction(demo: Path, tmp_path: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["params"]["format_version"] == 2 and manifest["params"]["audio_fraction"] == 0.75
    train = all_members(demo / "train")
    with_audio = sum("wav" in sample for sample in train.values())
    assert 0.6 * len(train) <= with_audio <= 0.9 * len(train)
    for sample in train.values():
        assert (json.loads(sample["json"])["audio"] is None) == ("wav" not in sample)
    assert all("wav" in sample for sample in tar_members(demo / "eval" / "shard-000000.tar").values())

    params = dict(train_shards=1, samples_per_shard=6, eval_samples=4, image_size=IMAGE_SIZE, seed=5, workers=1)
    write_demo_dataset(tmp_path / "silent", audio_fraction=0.0, **params)
    write_demo_dataset(tmp_path / "loud", audio_fraction=1.0, **params)
    silent, loud = all_members(tmp_path / "silent" / "train"), all_members(tmp_path / "loud" / "train")
    assert not any("wav" in s for s in silent.values()) and all("wav" in s for s in loud.values())
    for key in silent:  # only the presence of the sound changes
        for extension in ("png", "txt", "qa.json"):
            assert silent[key][extension] == loud[key][extension]
    with pytest.raises(ValueError, match="audio_fraction=1.5"):
        write_demo_dataset(tmp_path / "x", audio_fraction=1.5, **params)


def test_demo_questions_match_the_attributes(demo: Path) -> None:
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["answers"] == list(ANSWERS) == list(ANSWER_VOCAB)
    questions = set()
    for key, sample in all_members(demo).items():
        attributes = json.loads(sample["json"])
        pairs = json.loads(sample["qa.json"])
        assert [pair["kind"] for pair in pairs] == ["colour", "shape", "position", "size"]
        for pair in pairs:
            question, answer = pair["question"], pair["answer"]
            assert answer == attributes[pair["kind"]] and answer in ANSWERS, key
            assert question.endswith("?")
            words = question.rstrip("?").split()
            leaks = {"colour": COLOUR_ORDER, "shape": SHAPE_SYNONYMS, "position": PLACE_WORDS}.get(pair["kind"], ())
            assert not any(leak in question if " " in leak else leak in words for leak in leaks), question
            questions.add(question.replace(attributes["colour"], "C"))
    assert len(questions) > 40, "the wording hardly varies"


# ----------------------------------------------------------------------------------------------
# Batches


def test_batches_carry_audio_and_questions(demo: Path, tokenizer: Tokenizer) -> None:
    members = all_members(demo)
    reference = spm.SentencePieceProcessor(model_file=str(demo / "tokenizer.model"))

    def ids(text: str) -> list[int]:
        pieces = reference.encode(text)
        return [2, *pieces, 3] + [0] * (TEXT_LENGTH - len(pieces) - 2)

    batches = take(build_train_loader(data_cfg(demo), tokenizer, 0, 1, 32), 6)  # two epochs of 96
    for batch in batches:
        size = len(batch["keys"])
        assert batch["audio"].dtype == torch.float32 and batch["audio"].shape[0] == size
        assert batch["audio"].shape[1] % 1600 == 0
        assert batch["audio"].shape[1] - 1600 < int(batch["audio_lengths"].max()) <= batch["audio"].shape[1]
        assert batch["audio_lengths"].dtype == torch.int64 and batch["has_audio"].dtype == torch.bool
        assert batch["has_audio"].any() and not batch["has_audio"].all(), "a batch should mix present and missing audio"
        for name in ("question_ids", "question_mask", "answer_ids", "answer_mask"):
            assert batch[name].shape == (size, TEXT_LENGTH)
        assert batch["answer"].shape == (size,) and batch["answer"].dtype == torch.int64
        for row, key in enumerate(batch["keys"]):
            sample = members[key]
            length = int(batch["audio_lengths"][row])
            assert bool(batch["has_audio"][row]) == ("wav" in sample) == (length > 0)
            if "wav" in sample:
                assert torch.equal(batch["audio"][row, :length], torch.from_numpy(read_wav(sample["wav"])).float())
            assert not batch["audio"][row, length:].any(), "padding is not zero"
            pairs = [(p["question"], p["answer"]) for p in json.loads(sample["qa.json"])]
            question = reference.decode(batch["question_ids"][row][batch["question_mask"][row]].tolist())
            answer = ANSWER_VOCAB[int(batch["answer"][row])]
            assert (question, answer) in pairs
            assert batch["question_ids"][row].tolist() == ids(question)
            assert batch["answer_ids"][row].tolist() == ids(answer)
            n = len(reference.encode(answer)) + 2
            assert batch["answer_mask"][row].tolist() == [True] * n + [False] * (TEXT_LENGTH - n)
    # one question per sample per pass, not always the same one
    by_epoch: dict[int, dict[str, int]] = {}
    for batch in batches:
        for row, key in enumerate(batch["keys"]):
            by_epoch.setdefault(batch["epoch"], {})[key] = int(batch["answer"][row])
    assert set(by_epoch) == {0, 1} and by_epoch[0].keys() == by_epoch[1].keys()
    assert sum(by_epoch[0][k] != by_epoch[1][k] for k in by_epoch[0]) > 30

    evaluation = list(iter_eval_batches(data_cfg(demo), tokenizer, 16))
    assert all(bool(b["has_audio"].all()) for b in evaluation)
    assert all(int(b["answer"].min()) >= 0 for b in evaluation)
    again = list(iter_eval_batches(data_cfg(demo), tokenizer, 16))
    for first, second in zip(evaluation, again):
        assert torch.equal(first["question_ids"], second["question_ids"])


def test_samples_without_audio_or_questions_still_stream(demo: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Older shards and other datasets: no wav, no qa.json; one with an answer outside the vocabulary."""
    with wds.TarWriter(str(tmp_path / "plain.tar"), encoder=False) as writer:
        for i in range(5):
            writer.write({"__key__": f"plain-{i}", "png": png_bytes(i), "txt": f"caption {i}".encode()})
        qa = json.dumps([{"question": "what is it?", "answer": "a teapot"}]).encode()
        writer.write({"__key__": "other", "png": png_bytes(9), "txt": b"a teapot", "qa.json": qa})
    cfg = data_cfg(demo, train_shards=str(tmp_path), eval_shards=str(tmp_path))
    for batch in (take(build_train_loader(cfg, tokenizer, 0, 1, 6), 1)[0], next(iter_eval_batches(cfg, tokenizer, 6))):
        assert batch["skipped"] == 0 and len(batch["keys"]) == 6
        assert batch["audio"].shape == (6, 1600) and not batch["audio"].any()
        assert not batch["has_audio"].any() and not batch["audio_lengths"].any()
        assert batch["answer"].tolist() == [-1] * 6
        other = batch["keys"].index("other")
        for row in range(6):
            assert bool(batch["question_mask"][row].any()) == (row == other)
            assert bool(batch["answer_mask"][row].any()) == (row == other)
        assert not batch["question_ids"][torch.arange(6) != other].any()

    placeholder = placeholder_batch(cfg)
    assert placeholder["audio"].shape == (1, 1600) and placeholder["audio_lengths"].tolist() == [0]
    assert placeholder["has_audio"].tolist() == [False] and placeholder["answer"].tolist() == [-1]
    for name in ("question_ids", "question_mask", "answer_ids", "answer_mask"):
        assert placeholder[name].shape == (1, TEXT_LENGTH) and not placeholder[name].any()


def test_corrupt_wav_or_questions_are_bad_samples(demo: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    good = wav_bytes(3)
    with wds.TarWriter(str(tmp_path / "dirty.tar"), encoder=False) as writer:
        writer.write({"__key__": "bad-header", "png": png_bytes(1), "txt": b"x", "wav": b"RIFF garbage"})
        writer.write({"__key__": "bad-truncated", "png": png_bytes(2), "txt": b"x", "wav": good[:-1001]})
        writer.write({"__key__": "bad-qa", "png": png_bytes(3), "txt": b"x", "qa.json": b'{"question": 1}'})
        for i in range(4):
            writer.write({"__key__": f"good-{i}", "png": png_bytes(10 + i), "txt": b"y", "wav": wav_bytes(i)})
    cfg = data_cfg(demo, train_shards=str(tmp_path), eval_shards=str(tmp_path), shuffle_buffer=0)
    evaluation = list(iter_eval_batches(cfg, tokenizer, 8))
    assert evaluation[0]["keys"] == [f"good-{i}" for i in range(4)] and evaluation[0]["skipped"] == 3
    assert evaluation[0]["audio_lengths"].tolist() == [4000] * 4
    training = take(build_train_loader(cfg, tokenizer, 0, 1, 4), 2)
    assert [b["keys"] for b in training] == [[f"good-{i}" for i in range(4)]] * 2
    assert [b["skipped"] for b in training] == [3, 3]
    # every raw sample counts, bad ones included: 7 a batch (one epoch of the one shard)
    assert [b["seen"] for b in training] == [7, 7]
    resumed = take(build_train_loader(cfg, tokenizer, 0, 1, 4, DataPosition(1, {0: training[0]["position"]})), 1)
    assert resumed[0]["keys"] == training[1]["keys"] and resumed[0]["skipped"] == 3
    # A model that reads neither audio nor questions (extras=()) keeps every sample and reads neither.
    plain = list(iter_eval_batches(cfg, tokenizer, 8, extras=()))
    assert plain[0]["keys"] == ["bad-header", "bad-truncated", "bad-qa"] + [f"good-{i}" for i in range(4)]
    assert plain[0]["skipped"] == 0 and not plain[0]["has_audio"].any() and (plain[0]["answer"] == -1).all()
    assert take(build_train_loader(cfg, tokenizer, 0, 1, 7, extras=()), 1)[0]["skipped"] == 0
    with pytest.raises(ValueError, match="extras"):
        next(iter_eval_batches(cfg, tokenizer, 8, extras=("video",)))


def test_global_batches_slice_every_field(demo: Path, tokenizer: Tokenizer) -> None:
    cfg = data_cfg(demo, global_batches=True)
    whole = take(build_train_loader(cfg, tokenizer, 0, 1, 8), 3)
    halves = [take(build_train_loader(cfg, tokenizer, rank, 2, 4), 3) for rank in range(2)]
    for step, batch in enumerate(whole):
        for name in ("audio", "audio_lengths", "has_audio", "question_ids", "answer", "answer_mask"):
            assert torch.equal(torch.cat([halves[0][step][name], halves[1][step][name]]), batch[name]), name


def test_audio_is_cut_to_data_max_audio_seconds(demo: Path, tokenizer: Tokenizer) -> None:
    """data.max_audio_seconds cuts every clip (0.4-0.6 s in the demo) and bounds the padding."""
    from dataclasses import replace

    full = next(iter_eval_batches(data_cfg(demo), tokenizer, 16))
    cut = next(iter_eval_batches(replace(data_cfg(demo), max_audio_seconds=0.3), tokenizer, 16))
    assert int(full["audio_lengths"].max()) > 4800  # the clips are longer than 0.3 s
    assert cut["audio_lengths"].tolist() == full["audio_lengths"].clamp(max=4800).tolist()
    assert cut["audio"].shape[1] == 4800 and torch.equal(cut["audio"], full["audio"][:, :4800])
