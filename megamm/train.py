"""The training loop: a small Trainer with explicit, checkpointed state.

``run_pretraining`` is what ``launchers/pretrain.py`` calls on every rank: it validates the
configuration before any process group starts, builds the parallel state, model, DeepSpeed
engine and data loader, resumes if asked, trains, checkpoints and evaluates retrieval.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import yaml

from megamm.config import ConfigError, TrainConfig, to_dict
from megamm.data import Batch, Tokenizer, build_train_loader, iter_eval_batches
from megamm.engine import (
    build_ds_config,
    build_engine,
    check_layout,
    device,
    init_distributed,
    latest_complete,
    load_checkpoint,
    load_template,
    save_checkpoint,
)
from megamm.evaluation import retrieval_metrics
from megamm.metrics import MetricsWriter, Throughput
from megamm.model import MultiModalTransformer
from megamm.parallel import ParallelState

log = logging.getLogger("megamm")


@dataclass
class TrainState:
    """What, besides model and optimizer, a resumed run needs to continue exactly."""

    step: int = 0
    """Optimizer steps completed."""
    batches_consumed: int = 0
    """Micro batches this data-parallel rank has taken from its loader (the data position)."""
    samples_skipped: int = 0
    """Bad samples this data-parallel rank's loader has skipped so far."""


def _to_device(batch: Batch, target: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        batch["image"].to(target, non_blocking=True),
        batch["text_ids"].to(target, non_blocking=True),
        batch["text_mask"].to(target, non_blocking=True),
    )


def _dp_sum(values: list[float], parallel: ParallelState) -> list[float]:
    """Sum floats over the data-parallel group (identity in a single process)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if parallel.dp_size > 1:
        dist.all_reduce(tensor, group=parallel.dp_group)
    return tensor.tolist()


def evaluate_retrieval(engine: Any, batches: list[Batch], parallel: ParallelState) -> dict[str, float]:
    """Embed the evaluation set (batches split round-robin over data-parallel ranks) and score it.

    Every data-parallel rank runs the same number of forward passes (ZeRO-3 gathers weights
    collectively); a rank without a batch in the last round re-embeds batch 0 and drops it.
    """
    if not batches:
        raise ValueError("the evaluation set is empty; check data.eval_shards")
    target = device()
    local: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    engine.eval()
    with torch.no_grad():
        for round_start in range(0, len(batches), parallel.dp_size):
            index = round_start + parallel.dp_rank
            batch = batches[index] if index < len(batches) else batches[0]
            out = engine(*_to_device(batch, target), compute_loss=False)
            if index < len(batches):
                local.append((index, out["image_emb"].float().cpu(), out["text_emb"].float().cpu()))
    engine.train()
    gathered: list[Any] = [local]
    if parallel.dp_size > 1:
        gathered = [None] * parallel.dp_size
        dist.all_gather_object(gathered, local, group=parallel.dp_group)
    ordered = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    images = torch.cat([item[1] for item in ordered])  # (N, E)
    texts = torch.cat([item[2] for item in ordered])  # (N, E)
    return retrieval_metrics(images, texts)


class Trainer:
    """Runs optimizer steps on a DeepSpeed engine, logging, evaluating and checkpointing."""

    def __init__(
        self,
        engine: Any,
        config: TrainConfig,
        parallel: ParallelState,
        batches: Iterator[Batch],
        eval_batches: list[Batch],
        writer: MetricsWriter,
        state: TrainState,
    ) -> None:
        self.engine = engine
        self.config = config
        self.parallel = parallel
        self.batches = batches
        self.eval_batches = eval_batches
        self.writer = writer
        self.state = state
        self.device = device()

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum_steps`` micro batches; returns the mean local loss."""
        total = 0.0
        for _ in range(self.config.grad_accum_steps):
            batch = next(self.batches)
            self.state.batches_consumed += 1
            self.state.samples_skipped += int(batch.get("skipped", 0))
            loss = self.engine(*_to_device(batch, self.device))["loss"]
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        self.state.step += 1
        return total / self.config.grad_accum_steps

    def fit(self) -> dict[str, float]:
        cfg = self.config
        throughput = Throughput()
        global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * self.parallel.dp_size
        interval_loss, interval_steps = 0.0, 0
        while self.state.step < cfg.train_steps:
            interval_loss += self.train_step()
            interval_steps += 1
            throughput.add(global_batch)
            step = self.state.step
            last = step == cfg.train_steps
            if step % cfg.logging.log_interval == 0 or last:
                self._log_training(interval_loss / interval_steps, throughput.rate())
                interval_loss, interval_steps = 0.0, 0
            if cfg.eval_interval and step % cfg.eval_interval == 0 and not last:
                self.evaluate()
            if step % cfg.checkpoint.save_interval == 0 or last:
                self.save()
        return self.evaluate()

    def _log_training(self, local_loss: float, samples_per_second: float) -> None:
        loss_sum, skipped = _dp_sum([local_loss, float(self.state.samples_skipped)], self.parallel)
        loss = loss_sum / self.parallel.dp_size
        lr = self.engine.get_lr()[0]
        self.writer.scalars(
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/samples_per_second": samples_per_second,
                "train/samples_skipped": skipped,
            },
            self.state.step,
        )
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s",
            self.state.step,
            self.config.train_steps,
            loss,
            lr,
            samples_per_second,
        )

    def evaluate(self) -> dict[str, float]:
        metrics = evaluate_retrieval(self.engine, self.eval_batches, self.parallel)
        self.writer.scalars({f"eval/{name}": value for name, value in metrics.items()}, self.state.step)
        self.writer.flush()
        log.info("eval at step %d: %s", self.state.step, "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    def save(self) -> Path:
        client_state = {"train_state": asdict(self.state), "config": to_dict(self.config)}
        path = save_checkpoint(
            self.engine,
            self.config.checkpoint.dir,
            self.state.step,
            client_state,
            self.config.checkpoint.keep_last,
            parallel_layout(self.parallel.world_size, self.parallel.tp_size, self.parallel.dp_size),
        )
        self.writer.flush()
        log.info("saved checkpoint %s", path)
        return path


def parallel_layout(world_size: int, tensor_parallel: int, data_parallel: int) -> dict[str, int]:
    """The parallel sizes a checkpoint is tied to."""
    return {"world_size": world_size, "tensor_parallel": tensor_parallel, "data_parallel": data_parallel}


def resolve_resume(resume: str, checkpoint_dir: str) -> Optional[Path]:
    """Map --resume (auto | none | a checkpoint path) to the checkpoint to load, if any.

    Refuses to start fresh over a directory that already holds complete checkpoints, which a
    new run would otherwise overwrite step by step.
    """
    if resume == "auto":
        return latest_complete(checkpoint_dir)
    if resume == "none":
        existing = latest_complete(checkpoint_dir)
        if existing is not None:
            raise ConfigError(
                f"checkpoint.dir={checkpoint_dir} already holds checkpoints (newest: {existing.name}); "
                "pass --resume auto to continue that run, or choose another checkpoint.dir"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory (use auto, none or a path)")
    return path


def _setup_logging(rank: int) -> None:
    # DeepSpeed calls these torch collectives under their old names on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def run_pretraining(config: TrainConfig, ds_config_path: str, resume: str = "auto") -> dict[str, float]:
    """Train ``config`` on every rank of the current launch; returns the final eval metrics."""
    # Everything that can fail on bad input fails here, before any process group starts.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp_size = config.parallel.data_parallel_size(world_size)
    ds_config = build_ds_config(load_template(ds_config_path), config, dp_size)
    tokenizer = Tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.text.vocab_size="
            f"{config.model.text.vocab_size}; raise model.text.vocab_size to at least that"
        )
    checkpoint = resolve_resume(resume, config.checkpoint.dir)
    if checkpoint is not None:
        try:
            check_layout(checkpoint, parallel_layout(world_size, config.parallel.tensor_parallel, dp_size))
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None

    init_distributed()
    parallel = ParallelState.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
    _setup_logging(parallel.rank)
    zero_stage = ds_config["zero_optimization"]["stage"]
    log.info("%d ranks: tp=%d dp=%d zero=%d", world_size, parallel.tp_size, dp_size, zero_stage)
    if zero_stage != config.parallel.zero_stage:
        log.info(
            "parallel.zero_stage=%d: a single process has nothing to partition, so ZeRO stage %d runs "
            "(the same numbers, without ZeRO's per-module gather hooks)",
            config.parallel.zero_stage,
            zero_stage,
        )

    torch.manual_seed(config.seed)
    model = MultiModalTransformer(config.model, parallel)
    local = sum(p.numel() for p in model.parameters())
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    full = local + (parallel.tp_size - 1) * sharded
    log.info("model: %.2fM parameters (%.2fM on each tensor-parallel rank, before ZeRO)", full / 1e6, local / 1e6)
    engine = build_engine(model, config.optim, config.train_steps, ds_config, parallel)

    state = TrainState()
    if checkpoint is not None:
        client_state = load_checkpoint(engine, checkpoint)
        state = TrainState(**client_state["train_state"])
        log.info("resumed from %s at step %d", checkpoint, state.step)

    writer = MetricsWriter(config.logging.tensorboard_dir, active=parallel.rank == 0)
    if parallel.rank == 0:
        Path(config.logging.tensorboard_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.logging.tensorboard_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    loader = build_train_loader(
        config.data, tokenizer, parallel.dp_rank, parallel.dp_size, config.micro_batch_size, state.batches_consumed
    )
    eval_batches = list(iter_eval_batches(config.data, tokenizer, config.micro_batch_size))
    trainer = Trainer(engine, config, parallel, iter(loader), eval_batches, writer, state)
    try:
        metrics = trainer.fit() if state.step < config.train_steps else trainer.evaluate()
    finally:
        writer.close()
    if parallel.rank == 0:
        chance = 1.0 / sum(len(batch["keys"]) for batch in eval_batches)
        print(
            f"held-out retrieval: text->image R@1 {metrics['text_to_image_R@1']:.3f} "
            f"(chance {chance:.3f}), R@5 {metrics['text_to_image_R@5']:.3f}; "
            f"image->text R@1 {metrics['image_to_text_R@1']:.3f}",
            flush=True,
        )
        print(f"look at the run: tensorboard --logdir {config.logging.tensorboard_dir}", flush=True)
    dist.barrier()
    return metrics


__all__ = ["TrainState", "Trainer", "evaluate_retrieval", "resolve_resume", "run_pretraining"]
