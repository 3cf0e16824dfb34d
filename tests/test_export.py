"""tools/export_checkpoint.py on a real checkpoint: a short run of the whole model (caption decoder
included) through the `deepspeed` launcher at TP=2 x DP=2 under ZeRO-3, exported, loads at TP=1 and
gives the outputs the checkpoint gives at TP=2 (1e-5 relative); split again over TP=2 it is the
checkpoint's model bit for bit. The tokenizer is checked against the checkpoint's fingerprint.

The run's end-of-run evaluation (retrieval, then greedy captions and answers under ZeRO-3, every
rank decoding) reads two shards of 4 held-out samples, one per data-parallel rank: one round each.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import megamm
from megamm.config import load_config
from megamm.data import Tokenizer, iter_eval_batches, train_tokenizer
from megamm.engine import complete_checkpoints
from tests.distributed import run_distributed
from tests.launch import ROOT, deepspeed_command, overrides, run

RUN = {
    "parallel.tensor_parallel": "2",
    "parallel.zero_stage": "3",
    "micro_batch_size": "4",
    "train_steps": "2",
    "checkpoint.save_interval": "2",
}
FIELDS = ("image", "text_ids", "text_mask", "audio", "audio_lengths", "has_audio", "question_ids", "question_mask", "answer")


def _small_eval_shards(data: dict[str, str], out: Path, shards: int = 2, per_shard: int = 4) -> Path:
    """The first ``shards`` x ``per_shard`` samples of the held-out shard, as shards of their own."""
    (source,) = sorted(Path(data["data.eval_shards"]).glob("*.tar"))
    out.mkdir()
    with tarfile.open(source) as tar:
        members = tar.getmembers()
        keys = list(dict.fromkeys(member.name.split(".")[0] for member in members))[: shards * per_shard]
        for index in range(shards):
            own = set(keys[index * per_shard : (index + 1) * per_shard])
            with tarfile.open(out / f"shard-{index:06d}.tar", "w") as shard:
                for member in members:
                    if member.name.split(".")[0] in own:
                        shard.addfile(member, tar.extractfile(member))
    return out


def _batch(data: dict[str, str]) -> dict[str, torch.Tensor]:
    config = load_config("tiny", [f"{k}={v}" for k, v in data.items()])
    batch = next(iter_eval_batches(config.data, Tokenizer(config.data.tokenizer), 6, extras=config.model.data_extras))
    return {key: batch[key] for key in FIELDS}


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch, compute_loss=False)
    return {name: getattr(out, name) for name in ("image_emb", "text_emb", "audio_emb", "vqa_logits")}


def _reference(rank: int, world: int, checkpoint: str, export: str, batch: dict, out: str) -> None:
    """At TP=2: the checkpoint's own weights of this rank, and the export split over the group."""
    from megamm.config import config_from_dict
    from megamm.engine import load_model_state, load_model_weights, read_marker
    from megamm.model import MultiModalTransformer
    from megamm.parallel import ParallelState

    parallel = ParallelState.initialize(tensor_parallel=world)
    config = config_from_dict(read_marker(checkpoint)["config"]).model
    model = MultiModalTransformer(config, parallel, seed=1).eval()
    load_model_state(model, load_model_weights(checkpoint, parallel.tp_rank))
    reference = _outputs(model, batch)
    split = megamm.MultiModalTransformer.from_pretrained(export, parallel=parallel)
    for name, tensor in model.state_dict().items():
        assert torch.equal(split.state_dict()[name], tensor), name
    assert all(torch.equal(value, reference[name]) for name, value in _outputs(split, batch).items())
    if rank == 0:
        torch.save(reference, out)


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/export_checkpoint.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_tp2_zero3_checkpoint_exports_and_loads_at_tp1(data: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evaluation = _small_eval_shards(data, tmp_path / "eval")
    changes = {**RUN, "data.eval_shards": str(evaluation)}
    args = ["--config", "tiny", *overrides(data, run_dir, **{k.replace(".", "__"): v for k, v in changes.items()})]
    result = run(deepspeed_command(4, args), tmp_path / "train.log")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "tp=2 dp=2 zero=3" in result.stdout
    assert "eval at step 2 over 8 pairs" in result.stdout and "caption_BLEU-4" in result.stdout
    [(step, checkpoint)] = complete_checkpoints(run_dir / "checkpoints")
    assert step == 2 and len(list(checkpoint.glob("*optim_states.pt"))) == 4

    export = tmp_path / "export"
    exported = _export(str(checkpoint), "--out", str(export))
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "export", "run", "train.log"], "scratch files left behind"

    batch = _batch(data)
    reference_file = tmp_path / "reference.pt"
    run_distributed(_reference, 2, tmp_path, str(checkpoint), str(export), batch, str(reference_file), timeout=120)
    reference = torch.load(reference_file, weights_only=True)
    model = megamm.MultiModalTransformer.from_pretrained(export)
    assert model.fusion is not None and model.audio_encoder is not None and hasattr(model, "itm_head")
    outputs = _outputs(model, batch)
    for name, value in reference.items():
        torch.testing.assert_close(outputs[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The trained weights, not a fresh model of the same config.
    fresh = megamm.MultiModalTransformer(model.config, seed=1)
    assert not torch.allclose(_outputs(fresh, batch)["image_emb"], outputs["image_emb"], atol=1e-3)

    # The tokenizer must be the run's: another one is refused, naming the flag to pass.
    other = train_tokenizer(["a tiny corpus of other words"] * 50, tmp_path / "other.model", 64)
    refused = _export(str(checkpoint), "--out", str(tmp_path / "refused"), "--tokenizer", str(other))
    assert refused.returncode == 2 and "is not the tokenizer the checkpoint was trained with" in refused.stderr
    assert "--tokenizer PATH" in refused.stderr and not (tmp_path / "refused").exists()
    incomplete = _export(str(run_dir / "checkpoints"), "--out", str(tmp_path / "refused"))
    assert incomplete.returncode == 2 and "is not a complete megamm checkpoint" in incomplete.stderr


def _check_whole_model_splits(rank: int, world: int) -> None:
    from megamm.engine.universal import check_split_info, parameter_splits, split_of, universal_checkpoint_info
    from megamm.model import MultiModalTransformer
    from megamm.parallel import ParallelState

    parallel = ParallelState.initialize(tensor_parallel=world)
    seen = set()
    for kind in ("gated", "concat", "bottleneck", "weighted"):
        model = MultiModalTransformer(load_config("tiny", [f"model.fusion.kind={kind}"]).model, parallel, seed=0)
        splits = parameter_splits(model)
        for name, param in model.named_parameters():
            sharded = bool(getattr(param, "tensor_model_parallel", False))
            assert sharded == (splits[name] != "replicated"), (kind, name)  # the marks agree with each other
            assert split_of(name) == splits[name], (kind, name, split_of(name), splits[name])
        info = universal_checkpoint_info(model.config.text.vocab_size, splits)
        check_split_info(info, splits, kind)  # as DeepSpeed's converter applies them, in its order
        check_split_info(universal_checkpoint_info(model.config.text.vocab_size), splits, kind)
        seen |= set(splits.values())
        stale = dict(info, **{"parameter_with_sub_params": [e for e in info["parameter_with_sub_params"] if "qkv" in e["patterns"][0]]})
        if "kv" in splits.values():  # patterns that miss a module stop the conversion, naming it
            with pytest.raises(ValueError, match=r"\.kv\.weight \(would be merged as column, is kv\)"):
                check_split_info(stale, splits, kind)
    assert seen == {"replicated", "qkv", "kv", "row", "vocabulary", "column"}


def test_split_patterns_fit_every_parameter_of_the_whole_model(tmp_path: Path) -> None:
    """Every tensor-parallel-sharded parameter of the whole model (each fusion kind, decoder and heads
    included) matches the pattern of its own split at TP=2, and no replicated one matches a split."""
    run_distributed(_check_whole_model_splits, 2, tmp_path, timeout=120)
