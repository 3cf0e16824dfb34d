"""Pretrained directories: save_pretrained -> from_pretrained is bit-exact for the whole model;
raw inputs (strings, PIL images, NumPy waveforms) through the attached processor give exactly
the tensors, and the outputs, of the training loader's preprocessing of the same sample; broken
directories are refused with the file and the fix; a write never spoils an existing directory."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import megamm
from megamm.config import load_config
from megamm.data import (
    SAMPLE_RATE,
    Processor,
    Tokenizer,
    decode_image,
    decode_wav,
    iter_captions,
    iter_eval_batches,
    train_tokenizer,
    write_demo_dataset,
)
from megamm.data.pipeline import MAX_AUDIO_SAMPLES
from megamm.model import MultiModalTransformer as PlainModel
from megamm.pretrained import CONFIG_FILE, WEIGHTS_FILE, PretrainedError, save_pretrained, write_safetensors


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """A one-shard demo dataset with audio and questions, and its tokenizer."""
    root = tmp_path_factory.mktemp("pretrained-data")
    write_demo_dataset(root, train_shards=1, samples_per_shard=16, eval_samples=8, image_size=32, seed=0)
    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    tokenizer = train_tokenizer(iter_captions(shards), root / "tok.model", 256)
    return {"root": root, "tokenizer": tokenizer, "eval": root / "eval"}


def _tiny_model(**overrides: str) -> PlainModel:
    config = load_config("tiny", [f"{key}={value}" for key, value in overrides.items()]).model
    model = PlainModel(config, seed=11)
    with torch.no_grad():  # trained-looking weights: gates open, no parameter left at its init value
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _outputs(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    keys = ("image", "text_ids", "text_mask", "audio", "audio_lengths", "has_audio", "question_ids", "question_mask",
            "answer", "answer_ids", "answer_mask")  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**{k: batch[k] for k in keys}, compute_loss=True)
    values = {name: getattr(out, name) for name in ("image_emb", "text_emb", "audio_emb", "itm_logits", "vqa_logits")}
    return {**values, **{f"loss/{name}": loss for name, loss in out.losses.items()}, "loss": out.loss}


def _eval_batch(demo: dict[str, Path], config) -> dict:
    data = load_config("tiny", [f"data.eval_shards={demo['eval']}", f"data.tokenizer={demo['tokenizer']}"]).data
    return next(iter_eval_batches(data, Tokenizer(demo["tokenizer"]), 4, extras=config.data_extras))


def test_save_then_load_is_bit_exact_for_the_whole_model(demo: dict[str, Path], tmp_path: Path) -> None:
    model = _tiny_model()
    directory = save_pretrained(model, tmp_path / "export", demo["tokenizer"])
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "processor.json", "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name != "export"], "the staging directory is left behind"

    loaded = megamm.MultiModalTransformer.from_pretrained(directory)
    assert isinstance(loaded, PlainModel) and not loaded.training and loaded.processor is not None
    assert loaded.config == model.config
    saved, restored = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name

    batch = _eval_batch(demo, model.config)
    reference, again = _outputs(model, batch), _outputs(loaded, batch)
    assert set(reference) >= {"itm_logits", "vqa_logits", "loss/captioning", "loss/vqa_generative", "loss/audio_text"}
    for name, value in reference.items():
        assert torch.equal(again[name], value), name

    # Saving the loaded model again writes the same bytes; so does the subclass's method.
    second = loaded.save_pretrained(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.model", "processor.json"):
        assert (second / name).read_bytes() == (directory / name).read_bytes(), name
    # The file is a plain safetensors file: the reference reader sees every tensor.
    assert all(torch.equal(t, saved[n]) for n, t in load_file(str(directory / WEIGHTS_FILE)).items())


def test_bf16_export_loads_as_rounded_fp32(demo: dict[str, Path], tmp_path: Path) -> None:
    model = _tiny_model(**{"model.fusion.kind": "concat"})
    directory = save_pretrained(model, tmp_path / "bf16", demo["tokenizer"], dtype="bf16")
    assert json.loads((directory / CONFIG_FILE).read_text())["dtype"] == "bf16"
    assert (directory / WEIGHTS_FILE).stat().st_size < 0.55 * 4 * sum(p.numel() for p in model.parameters())
    loaded = megamm.MultiModalTransformer.from_pretrained(directory)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name


def _demo_sample(eval_dir: Path) -> dict[str, bytes]:
    """The raw members of the first sample of the eval shard."""
    shard = sorted(eval_dir.glob("*.tar"))[0]
    members: dict[str, bytes] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if members and key != members["__key__"].decode():
                break
            members["__key__"] = key.encode()
            members[ext] = tar.extractfile(member).read()
    return members


def test_raw_inputs_equal_the_training_loaders_tensors(demo: dict[str, Path], tmp_path: Path) -> None:
    model = _tiny_model()
    loaded = megamm.MultiModalTransformer.from_pretrained(save_pretrained(model, tmp_path / "export", demo["tokenizer"]))
    processor = loaded.processor
    sample = _demo_sample(demo["eval"])
    assert {"png", "txt", "wav", "qa.json"} <= set(sample), sorted(sample)
    caption = sample["txt"].decode().strip()
    question = json.loads(sample["qa.json"])[0]["question"]
    image = Image.open(io.BytesIO(sample["png"]))
    pcm = decode_wav(sample["wav"])

    # What the training loader makes of the same sample (its first eval batch, one row).
    data = load_config("tiny", [f"data.eval_shards={demo['eval']}", f"data.tokenizer={demo['tokenizer']}"]).data
    batch = next(iter_eval_batches(data, Tokenizer(demo["tokenizer"]), 1, extras=model.config.data_extras))
    assert batch["keys"] == [sample["__key__"].decode()]
    tensors = processor(text=caption, image=image, audio=pcm)
    for key in ("text_ids", "text_mask", "image", "audio", "audio_lengths"):
        assert tensors[key].dtype == batch[key].dtype and torch.equal(tensors[key], batch[key]), key
    float_audio = processor(audio=pcm.astype(np.float32) / 32768.0)
    assert torch.equal(float_audio["audio"], batch["audio"])
    assert torch.equal(processor(image=np.asarray(image.convert("RGB")))["image"], batch["image"])

    # The forward pass on raw inputs equals the tensor path on the loader's batch, output by output.
    raw = loaded(text=caption, image=image, audio=pcm, question=question, compute_loss=False)
    asked = processor(question=question)
    tensor = loaded(
        image=batch["image"], text_ids=batch["text_ids"], text_mask=batch["text_mask"], audio=batch["audio"],
        audio_lengths=batch["audio_lengths"], question_ids=asked["question_ids"], question_mask=asked["question_mask"],
        compute_loss=False,
    )  # fmt: skip
    for name in ("image_emb", "text_emb", "audio_emb", "vqa_logits"):
        assert torch.equal(getattr(raw, name), getattr(tensor, name)), name
    generated = loaded.generate(image=image, audio=pcm, max_length=6)
    assert torch.equal(generated, loaded.generate(image=batch["image"], audio=batch["audio"],
                                                  audio_lengths=batch["audio_lengths"], max_length=6))  # fmt: skip
    assert isinstance(processor.decode(generated), list) and isinstance(processor.decode(generated[0]), str)


def test_processor_batches_crops_and_cuts_like_the_loader(demo: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = Tokenizer(demo["tokenizer"])
    processor = Processor(tokenizer, image_size=16, max_length=8)
    wide = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    out = processor(text=["a red square", "a big blue circle on the left of the image"], image=[wide, wide])
    assert out["text_ids"].shape == (2, 8) and out["text_mask"][1].all()  # the long caption is cut, EOS kept
    assert out["text_ids"][1, -1].item() == tokenizer.eos_id
    expected = torch.from_numpy(decode_image(buffer.getvalue(), 16).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out["image"][0], expected) and out["image"].shape == (2, 3, 16, 16)
    clips = processor(audio=[np.full(100, 0.5, np.float32), np.zeros(MAX_AUDIO_SAMPLES + 5, np.float32)])
    assert clips["audio"].shape == (2, MAX_AUDIO_SAMPLES) and clips["audio_lengths"].tolist() == [100, MAX_AUDIO_SAMPLES]
    assert clips["audio"][0, :100].eq(0.5).all() and clips["audio"][0, 100:].eq(0).all()
    assert processor.sample_rate == SAMPLE_RATE
    with pytest.raises(ValueError, match="NumPy image must be uint8"):
        processor(image=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="mono waveform"):
        processor(audio=[np.zeros((10, 2), np.float32)])

    processor.save(tmp_path / "p")
    again = Processor.load(tmp_path / "p")
    assert (again.image_size, again.max_length, again.tokenizer.fingerprint) == (16, 8, tokenizer.fingerprint)


def test_a_plain_model_without_a_processor_says_how_to_get_one() -> None:
    model = PlainModel(load_config("clip_tiny").model, seed=0)
    with pytest.raises(ValueError, match="no processor is attached.*from_pretrained"):
        model(text="a red square", compute_loss=False)
    with pytest.raises(PretrainedError, match="needs the model's tokenizer"):
        save_pretrained(model, "/nonexistent/never-written")


def test_broken_directories_are_refused_naming_the_file_and_the_fix(demo: dict[str, Path], tmp_path: Path) -> None:
    model = PlainModel(load_config("clip_tiny").model, seed=0)
    good = save_pretrained(model, tmp_path / "good", demo["tokenizer"])
    tensors = load_file(str(good / WEIGHTS_FILE))

    def variant(name: str, weights: dict[str, torch.Tensor]) -> Path:
        directory = save_pretrained(model, tmp_path / name, demo["tokenizer"])
        save_file(weights, str(directory / WEIGHTS_FILE))
        return directory

    missing = variant("missing", {k: v for k, v in tensors.items() if k != "text_projection.linear.weight"})
    extra = variant("extra", {**tensors, "surplus.weight": torch.zeros(2)})
    misshaped = variant("misshaped", {**tensors, "text_projection.linear.weight": torch.zeros(3, 3)})
    for directory, words in ((missing, "1 missing: text_projection.linear.weight"), (extra, "1 unexpected: surplus.weight"),
                             (misshaped, "1 of another shape: text_projection.linear.weight (3, 3)")):  # fmt: skip
        with pytest.raises(PretrainedError) as error:
            megamm.MultiModalTransformer.from_pretrained(directory)
        assert str(directory / WEIGHTS_FILE) in str(error.value) and words in str(error.value)
        assert "tools/export_checkpoint.py" in str(error.value)

    (tmp_path / "incomplete").mkdir()
    (tmp_path / "incomplete" / CONFIG_FILE).write_text((good / CONFIG_FILE).read_text())
    with pytest.raises(PretrainedError, match="model.safetensors, tokenizer.model, processor.json missing"):
        megamm.MultiModalTransformer.from_pretrained(tmp_path / "incomplete")
    truncated = save_pretrained(model, tmp_path / "truncated", demo["tokenizer"])
    (truncated / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        megamm.MultiModalTransformer.from_pretrained(truncated)
    pickled = save_pretrained(model, tmp_path / "pickled", demo["tokenizer"])
    torch.save(model.state_dict(), pickled / WEIGHTS_FILE)  # a pickle under the safetensors name is never unpickled
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        megamm.MultiModalTransformer.from_pretrained(pickled)


def test_a_failed_write_leaves_the_existing_directory_as_it_was(demo: dict[str, Path], tmp_path: Path) -> None:
    model = PlainModel(load_config("clip_tiny").model, seed=0)
    directory = save_pretrained(model, tmp_path / "export", demo["tokenizer"])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = PlainModel(load_config("clip_tiny").model, seed=1)
    state = other.state_dict()
    specs = [(name, tuple(t.shape)) for name, t in state.items()]

    def failing():
        for index, item in enumerate(state.items()):
            if index == 5:
                raise RuntimeError("disk full")
            yield item

    from megamm.pretrained import write_pretrained

    with pytest.raises(RuntimeError, match="disk full"):
        write_pretrained(directory, other.config, Processor.for_model(Tokenizer(demo["tokenizer"]), other.config), specs, failing())
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "staging left behind"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="not a pretrained directory"):
        save_pretrained(model, tmp_path / "notes", demo["tokenizer"])
    with pytest.raises(PretrainedError, match="expected text_encoder"):
        write_safetensors(tmp_path / "x.safetensors", [("text_encoder.a", torch.float32, (2,))], iter([("b", torch.zeros(2))]))
