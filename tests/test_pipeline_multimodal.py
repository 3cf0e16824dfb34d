"""The whole multi-modal model's pipeline form computes what the plain model computes.

- Names: for every fusion kind, every parameter of the pipeline layers (named as DeepSpeed's
  ``PipelineModule`` names them, the tied decoder embedding under ``tied_modules``) maps one-to-one
  onto the plain model's parameter holding the same seeded weights, and back.
- One process: the layers run in turn (the tied embedding used twice) give the plain model's loss
  and every parameter's gradient, for every fusion kind.
- DeepSpeed: the ``tiny`` recipe at PP=2, at TP=2 x PP=2 and at PP=4 (DeepSpeed's ``PipelineEngine``,
  ZeRO-1, two micro-batches in flight) trains 5 steps on fixed batches to the losses and weights
  of one process training the plain model with torch AdamW, megamm's schedule, gradient clipping
  and the logit-scale bound.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from megamm.config import FUSION_KINDS, ModelConfig, TrainConfig, load_config
from megamm.engine.forms import ParameterNames
from megamm.model import MultiModalTransformer
from megamm.model.heads import CLAMP_ATTRIBUTE
from megamm.model.multimodal import weight_init
from megamm.model.pipeline import ContrastiveLoss, MultiModalLoss, plan
from megamm.parallel import ParallelState
from tests.distributed import run_distributed

SEED = 7
BATCH = 4
STEPS = 5
ACCUMULATION = 2
LOSS_RTOL = 1e-5


def _config(*overrides: str) -> TrainConfig:
    return load_config("tiny", [f"micro_batch_size={BATCH}", f"grad_accum_steps={ACCUMULATION}",
                                f"train_steps={STEPS}", "optim.warmup_steps=2", *overrides])  # fmt: skip


def _batch(model: ModelConfig, index: int) -> dict[str, torch.Tensor]:
    """A fixed batch with every input the whole model reads: short and missing audio, a row without
    an image and one without a caption (audio pairs), rows without a question, answers of every
    kind (-1 included), captions of every length."""
    generator = torch.Generator().manual_seed(100 + index)
    length, vocab = model.text.max_length, model.text.vocab_size

    def tokens(low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(length)[None, :] < torch.randint(low, high, (BATCH, 1), generator=generator)
        return torch.randint(4, vocab, (BATCH, length), generator=generator).masked_fill(~mask, 0), mask

    ids, mask = tokens(3, length + 1)
    question_ids, question_mask = tokens(2, length + 1)
    question_mask[index % BATCH] = False
    question_ids[index % BATCH] = 0
    answer_ids, answer_mask = tokens(2, 6)
    lengths = torch.randint(2000, 8001, (BATCH,), generator=generator)
    lengths[(index + 1) % BATCH] = 0
    has_image, has_text = torch.ones(BATCH, dtype=torch.bool), torch.ones(BATCH, dtype=torch.bool)
    has_image[(index + 2) % BATCH] = False
    has_text[(index + 3) % BATCH] = False
    size = model.image.image_size
    return {
        "image": torch.randn(BATCH, 3, size, size, generator=generator),
        "text_ids": ids, "text_mask": mask,
        "audio": 0.1 * torch.randn(BATCH, 8000, generator=generator), "audio_lengths": lengths, "has_audio": lengths > 0,
        "has_image": has_image, "has_text": has_text,
        "question_ids": question_ids, "question_mask": question_mask,
        "answer": torch.randint(-1, model.objectives.num_answers, (BATCH,), generator=generator),
        "answer_ids": answer_ids, "answer_mask": answer_mask,
    }  # fmt: skip


def _pipeline_layers(model: ModelConfig) -> tuple[Any, list[Any], dict[str, torch.nn.Parameter]]:
    """The plan, its layers built in one process (a tied module once, used twice) and their
    parameters as DeepSpeed names them."""
    from deepspeed.pipe import TiedLayerSpec

    layout = plan(model, ParallelState.single(), weight_init(model, SEED))
    layers, tied, named = [], {}, {}
    for index, spec in enumerate(layout.specs):
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            layers.append(module if spec.forward_fn is None else partial(spec.forward_fn, module))
            named.update({f"tied_modules.{spec.key}.{name}": p for name, p in module.named_parameters()})
        else:
            layers.append(spec.build())
            named.update({f"{index}.{name}": p for name, p in layers[-1].named_parameters()})
    return layout, layers, named


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_parameter_names_map_one_to_one_for_the_whole_model(kind: str) -> None:
    rotary = ("model.decoder.positions=rotary",) if kind == "weighted" else ()  # no position layer parameter
    model = _config(f"model.fusion.kind={kind}", *rotary).model
    plain = dict(MultiModalTransformer(model, seed=SEED).named_parameters())
    layout, _, pipeline = _pipeline_layers(model)
    assert len(layout.specs) == model.num_pipeline_layers
    names = ParameterNames(model)
    to_plain = {name: names.to_plain(name) for name in pipeline}
    assert sorted(to_plain.values()) == sorted(plain), set(to_plain.values()) ^ set(plain)
    for name, plain_name in to_plain.items():
        assert torch.equal(pipeline[name], plain[plain_name]), (name, plain_name)
        assert names.to_pipeline(plain_name) == name
    assert "tied_modules.decoder_embedding.token_embedding.weight" in pipeline


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_pipeline_layers_in_turn_give_the_plain_loss_and_gradients(kind: str) -> None:
    model = _config(f"model.fusion.kind={kind}").model
    inputs = _batch(model, 0)
    plain = MultiModalTransformer(model, seed=SEED)
    out = plain(**{name: tensor.clone() for name, tensor in inputs.items()})
    out["loss"].backward()
    layout, layers, pipeline = _pipeline_layers(model)
    stream = tuple(inputs[name] for name in layout.inputs)
    for layer in layers:
        stream = layer(stream)
    loss_fn = MultiModalLoss(model, None, layout.outputs)
    loss = loss_fn(stream, None)
    loss.backward()
    torch.testing.assert_close(loss, out["loss"], rtol=1e-6, atol=1e-6)
    scored = loss_fn.take_scored()
    assert sorted(scored) == sorted(out.losses)
    for name, value in out.losses.items():
        assert scored[name] == pytest.approx(value.item(), rel=1e-6, abs=1e-6), name
    names = ParameterNames(model)
    plain_params = dict(plain.named_parameters())
    for name, param in pipeline.items():
        want = plain_params[names.to_plain(name)].grad
        scale = float(want.abs().max())  # fp32 noise of a sum in another order, relative to the tensor's scale
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-4 * scale + 1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_the_dual_encoder_keeps_its_stream() -> None:
    """The image-text dual encoder's layers pass the tuples they always passed."""
    model = load_config("clip_tiny", []).model
    layout = plan(model, ParallelState.single(), weight_init(model, SEED))
    fields = [spec.module_kwargs["fields"] for spec in layout.specs]
    assert fields[0].inputs == ("image", "text_ids", "text_mask")
    assert fields[1].outputs == ("image", "text", "text_keys")
    assert fields[-1].outputs == layout.outputs == ("image_emb", "text_emb", "contrastive_scale")
    assert len(layout.specs) == model.num_pipeline_layers
    assert isinstance(ContrastiveLoss(None), ContrastiveLoss)


# --------------------------------------------------------------------------------------------
# Through DeepSpeed's PipelineEngine


def _reference(config: TrainConfig, out: Path) -> None:
    """The plain model in one process, plain torch: losses of every step, final weights."""
    from megamm.engine.builder import parameter_groups, warmup_cosine

    model = MultiModalTransformer(config.model, seed=SEED)
    optim = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, config.train_steps, optim.min_lr_ratio)
    )
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(ACCUMULATION):
            loss = model(**_batch(config.model, step * ACCUMULATION + micro))["loss"] / ACCUMULATION
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for param in model.parameters():
                bounds = getattr(param, CLAMP_ATTRIBUTE, None)
                if bounds is not None:
                    param.clamp_(*bounds)
        losses.append(total)
    torch.save({"losses": losses, "weights": {n: p.detach() for n, p in model.named_parameters()}}, out)


def _pipeline_run(rank: int, world: int, overrides: tuple[str, ...], reference: str, report: str) -> None:
    import deepspeed

    from megamm.engine import build_ds_config, build_engine, load_template
    from megamm.engine.runner import PipelineRunner
    from megamm.model.pipeline import MultiModalPipeline
    from megamm.parallel import shard_of

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # joins the group already there
    config = _config(*overrides)
    parallel = ParallelState.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
    model = MultiModalPipeline(config.model, parallel, config.parallel.pipeline_partition, seed=SEED)
    ds_config = build_ds_config(load_template("ds_configs/zero1.json"), config, parallel.dp_size)
    engine = build_engine(model, config.optim, config.train_steps, ds_config, parallel)
    runner = PipelineRunner(engine, parallel)
    losses = []
    for step in range(STEPS):
        batches = [_batch(config.model, step * ACCUMULATION + micro) for micro in range(ACCUMULATION)]
        losses.append(runner.train_step(batches))
    embeddings = runner.embed(_batch(config.model, 0))

    expected = torch.load(reference)
    names = ParameterNames(config.model)
    worst = 0.0
    for name, param in engine.module.named_parameters():
        full = expected["weights"][names.to_plain(name)]
        want = full
        if getattr(param, "tensor_model_parallel", False):
            want = shard_of(full, parallel.tp_rank, parallel.tp_size, param.partition_dim, param.partition_stride)
        torch.testing.assert_close(param.detach(), want, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, float((param.detach() - want).abs().max()))
    if engine.is_last_stage():
        assert sorted(embeddings) == ["audio", "image", "text"]
        assert all(e.shape == (BATCH, config.model.embed_dim) for e in embeddings.values())
        assert sorted(runner.objective_losses) == sorted(config.model.objectives.weights())
    else:
        assert embeddings is None
    with open(f"{report}.{rank}", "w") as handle:
        json.dump({"losses": losses, "worst_weight_difference": worst, "stages": [[int(a), int(b)] for a, b in model.stage_layers()]}, handle)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process's run, for every layout below (the parallel settings leave the plain model alone)."""
    out = tmp_path_factory.mktemp("pipeline-reference") / "reference.pt"
    _reference(_config(), out)
    return out


@pytest.mark.parametrize(
    "world, overrides",
    [
        (2, ("parallel.pipeline_parallel=2", "parallel.zero_stage=1")),
        # the decoder cut between stages: its tied token embedding lives on both
        (4, ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1",
             "parallel.pipeline_partition=27,4")),
        # middle stages receive both activations (masks and token ids among them) and gradients
        (4, ("parallel.pipeline_parallel=4", "parallel.zero_stage=1")),
    ],
    ids=["pp2", "tp2xpp2", "pp4"],
)  # fmt: skip
def test_whole_model_pipeline_trains_to_the_losses_of_one_process(
    reference: Path, tmp_path: Path, world: int, overrides: tuple
) -> None:
    report = tmp_path / "report.json"
    run_distributed(_pipeline_run, world, tmp_path, overrides, str(reference), str(report), timeout=300)
    expected = torch.load(reference)["losses"]
    for rank in range(world):
        result = json.loads(Path(f"{report}.{rank}").read_text())
        assert result["losses"] == pytest.approx(expected, rel=LOSS_RTOL), (rank, result)
