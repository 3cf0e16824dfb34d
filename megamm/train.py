"""The training loop: a small Trainer with explicit, checkpointed state.

``run_pretraining`` is what ``launchers/pretrain.py`` calls on every rank: it runs every cheap
check before any process group starts (``megamm.preflight``), takes the checkpoint directory's
run lock, builds the parallel state, model, DeepSpeed engine and data loader, resumes if asked,
trains, checkpoints and evaluates retrieval.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import yaml

from megamm.config import DataConfig, TrainConfig, to_dict
from megamm.data import (
    ANSWER_VOCAB,
    BAD_REASONS,
    Batch,
    DataPosition,
    Tokenizer,
    bad_summary,
    build_train_loader,
    iter_eval_batches,
    keys_digest,
    next_epochs,
    placeholder_batch,
)
from megamm.engine import (
    UNIVERSAL_CHECKPOINT_INFO,
    LaunchInfo,
    Preempted,
    RunLock,
    StopRequest,
    Watchdog,
    build_engine,
    check_shared_directory,
    Inputs,
    StepRunner,
    device,
    init_distributed,
    launch_info,
    load_checkpoint,
    load_model_state,
    load_model_weights,
    loss_scale,
    make_runner,
    universal_checkpoint_info,
    model_construction,
    full_numel,
    save_checkpoint,
    set_aside_abandoned,
    synchronize,
)
from megamm.evaluation import answer_accuracy, caption_bleu, retrieval_metrics
from megamm.fileio import atomic_output
from megamm.flops import image_tokens, model_flops_per_sample
from megamm.metrics import MetricsWriter, StepTimer, Throughput, host_max_rss_gb
from megamm.model import MultiModalTransformer
from megamm.model.pipeline import MultiModalPipeline
from megamm.parallel import ParallelState, get_rng_tracker, model_parallel_seed
from megamm.preflight import StartPlan, parallel_layout, preflight

log = logging.getLogger("megamm")


@dataclass
class TrainState:
    """What, besides model and optimizer, a resumed run needs to continue exactly.

    Every rank saves the same values (gathered over the data-parallel group first): under ZeRO
    stages 0-2 DeepSpeed writes the client state of data-parallel rank 0 only, and every rank
    loads that one.
    """

    step: int = 0
    """Optimizer steps completed."""
    batches_consumed: int = 0
    """Micro-batches each data-parallel rank has taken from its loader (its round-robin phase)."""
    samples_skipped: int = 0
    """Bad samples skipped by all data-parallel ranks together."""
    samples_seen: int = 0
    """Raw samples read by all data-parallel ranks together, good and bad."""
    bad_data: dict[str, int] = field(default_factory=dict)
    """Bad samples by reason (``megamm.data.BAD_REASONS``), all ranks together."""
    bad_shards: dict[str, int] = field(default_factory=dict)
    """Bad samples by shard, all ranks together (the :data:`KEPT_BAD_SHARDS` worst)."""
    data_position: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The state of each training stream of every data-parallel rank (stream id -> state)."""


KEPT_BAD_SHARDS = 100
"""Shards with bad samples that a checkpoint remembers (the worst ones)."""


INPUT_FIELDS = {
    "": ("image", "text_ids", "text_mask"),
    "audio": ("audio", "audio_lengths", "has_audio", "has_image", "has_text"),
    "qa": ("question_ids", "question_mask", "answer", "answer_ids", "answer_mask"),
}
"""The batch fields the model reads: always, and with each data extra (``ModelConfig.data_extras``)."""


def _inputs(batch: Batch, extras: Iterable[str] = ()) -> Inputs:
    """The model's inputs of one batch, on the host (the runner moves them)."""
    names = [name for extra in ("", *extras) for name in INPUT_FIELDS[extra]]
    return {name: batch[name] for name in names}  # type: ignore[literal-required]


RETRIEVAL_PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))
"""The modality pairs scored for retrieval, where the model embeds both sides."""


def _dp_sum(values: list[float], parallel: ParallelState) -> list[float]:
    """Sum floats over the data-parallel group (identity in a single process)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if parallel.dp_size > 1:
        dist.all_reduce(tensor, group=parallel.dp_group)
    return tensor.tolist()


def _dp_max(value: int, parallel: ParallelState) -> int:
    """The largest ``value`` over the data-parallel group."""
    tensor = torch.tensor([value], dtype=torch.int64)
    if parallel.dp_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=parallel.dp_group)
    return int(tensor.item())


def _dp_gather(value: Any, parallel: ParallelState) -> list[Any]:
    """Every data-parallel rank's ``value``, in rank order ([value] in a single process)."""
    if parallel.dp_size == 1:
        return [value]
    gathered: list[Any] = [None] * parallel.dp_size
    dist.all_gather_object(gathered, value, group=parallel.dp_group)
    return gathered


def _any_rank(flag: bool, parallel: ParallelState) -> bool:
    """True if ``flag`` holds on any data-parallel rank."""
    return _dp_sum([float(flag)], parallel)[0] > 0


def _rounds(
    batches: Iterable[Batch], parallel: ParallelState, progress: Optional[Callable[[], None]] = None
) -> Iterator[Optional[Batch]]:
    """This rank's batches, one per round, then None while another data-parallel rank still has
    some: every rank runs the same number of rounds (one small all-reduce each), as ZeRO-3's
    collective weight gathers need. A rank given None computes on a placeholder and drops the
    result. ``progress`` is called every round (a watchdog's heartbeat)."""
    iterator = iter(batches)
    while True:
        if progress is not None:
            progress()
        batch = next(iterator, None)
        if not _any_rank(batch is not None, parallel):
            return
        yield batch


def evaluate_retrieval(
    runner: StepRunner,
    batches: Iterable[Batch],
    parallel: ParallelState,
    placeholder: Batch,
    progress: Optional[Callable[[], None]] = None,
    extras: Iterable[str] = (),
) -> tuple[dict[str, float], int]:
    """Embed this rank's share of the evaluation set, gather every rank's embeddings and score
    retrieval for every modality pair the model embeds (:data:`RETRIEVAL_PAIRS`; a pair over
    the rows that have both sides).

    ``batches`` is streamed (this data-parallel rank's share, e.g. its evaluation shards); ranks
    may hold different numbers of batches. Every data-parallel rank runs the same number of
    forward passes, because ZeRO-3 gathers weights collectively: each round one small
    all-reduce says whether any rank still has a batch, and a rank without one embeds
    ``placeholder`` and drops the result. Returns the metrics and the number of image-text pairs
    scored, on every rank (under pipeline parallelism the last stage scores, and shares the result).
    Non-finite embeddings (a diverged run) count as misses and are reported in the log.
    ``progress`` is called every round (a watchdog's heartbeat). ``extras``: the batch fields
    the model reads beyond images and captions (``ModelConfig.data_extras``).
    """
    extras = tuple(extras)
    local: dict[str, list[torch.Tensor]] = {}
    scored_here = True
    for batch in _rounds(batches, parallel, progress):
        embeddings = runner.embed(_inputs(batch if batch is not None else placeholder, extras))
        scored_here = embeddings is not None
        if batch is not None and embeddings is not None:
            for modality, emb in embeddings.items():
                local.setdefault(modality, []).append(emb.float().cpu())  # (B, E)
            if "audio" in embeddings:
                local.setdefault("has_audio", []).append(batch["has_audio"].cpu())  # (B,)
    result = _score(local, parallel) if scored_here else None
    return runner.share(result)


def _score(local: dict[str, list[torch.Tensor]], parallel: ParallelState) -> tuple[dict[str, float], int]:
    """Retrieval metrics over every data-parallel rank's embeddings (collective over the group)."""
    parts = _dp_gather(local, parallel)
    names = sorted({name for part in parts for name in part})  # a rank without evaluation data sent nothing
    every = {name: torch.cat([t for part in parts for t in part.get(name, [])]) for name in names}
    images, texts = every.get("image", torch.empty(0)), every.get("text", torch.empty(0))
    if images.shape[0] == 0:
        raise ValueError("the evaluation set is empty; check data.eval_shards")
    present = {"image": torch.ones(len(images), dtype=torch.bool), "text": torch.ones(len(texts), dtype=torch.bool)}
    if "audio" in every:
        present["audio"] = every["has_audio"].bool()
    bad = int((~torch.isfinite(images).all(dim=1) | ~torch.isfinite(texts).all(dim=1)).sum())
    if bad:
        log.warning(
            "%d of %d evaluation pairs have non-finite embeddings (the run has diverged?); they count as misses",
            bad,
            images.shape[0],
        )
    metrics: dict[str, float] = {}
    for first, second in RETRIEVAL_PAIRS:
        if first in every and second in every:
            rows = present[first] & present[second]
            if int(rows.sum()) >= 2:
                metrics.update(retrieval_metrics(every[first][rows], every[second][rows], names=(first, second)))
    return metrics, images.shape[0]


def evaluate_generation(
    model: torch.nn.Module,
    engine: Any,
    batches: Iterable[Batch],
    parallel: ParallelState,
    placeholder: Batch,
    tokenizer: Tokenizer,
    progress: Optional[Callable[[], None]] = None,
) -> dict[str, float]:
    """Caption BLEU-4 (sacrebleu, against each sample's caption) and VQA accuracy (classified and
    generated answers) over this rank's share of the evaluation set, combined over the
    data-parallel group; the metrics the model's objectives make meaningful. Every rank decodes
    the same number of rounds and steps (ZeRO-3's gathers are collective). Greedy decoding."""
    objectives = model.config.objectives
    extras = model.config.data_extras
    device_ = device()
    hypotheses: list[str] = []
    references: list[str] = []
    predicted: dict[str, list[str]] = {"vqa": [], "vqa_generative": []}
    answers: list[str] = []
    engine.eval()
    with torch.no_grad():
        for batch in _rounds(batches, parallel, progress):
            inputs = {k: v.to(device_) for k, v in _inputs(batch if batch is not None else placeholder, extras).items()}
            question = {k: inputs.pop(k) for k in INPUT_FIELDS["qa"] if k in inputs}
            if objectives.captioning > 0:
                context = {k: inputs[k] for k in ("image", "audio", "audio_lengths", "has_audio") if k in inputs}
                ids = model.generate(**context)
                if batch is not None:
                    hypotheses += [tokenizer.decode(row.tolist()) for row in ids.cpu()]
                    references += [tokenizer.decode(row.tolist()) for row in batch["text_ids"]]
            if model.config.uses_questions:
                asked = question["question_mask"].any(dim=1).cpu()  # (B,)
                if objectives.vqa > 0:
                    logits = engine(**inputs, question_ids=question["question_ids"],
                                    question_mask=question["question_mask"], compute_loss=False)["vqa_logits"]
                    if batch is not None:
                        predicted["vqa"] += [ANSWER_VOCAB[i] for i in logits.argmax(dim=1).cpu()[asked].tolist()]
                if objectives.vqa_generative > 0:
                    context = {k: inputs[k] for k in ("image", "audio", "audio_lengths", "has_audio") if k in inputs}
                    ids = model.generate(**context, question_ids=question["question_ids"],
                                         question_mask=question["question_mask"])
                    if batch is not None:
                        predicted["vqa_generative"] += [tokenizer.decode(row.tolist()) for row in ids.cpu()[asked]]
                if batch is not None:
                    answers += [tokenizer.decode(row.tolist()) for row in batch["answer_ids"][asked]]
    engine.train()
    parts = _dp_gather((hypotheses, references, predicted, answers), parallel)
    metrics: dict[str, float] = {}
    if objectives.captioning > 0:
        metrics["caption_BLEU-4"] = caption_bleu([h for p in parts for h in p[0]], [r for p in parts for r in p[1]])
    everyone_answers = [a for p in parts for a in p[3]]
    for name, key in (("vqa", "vqa_accuracy"), ("vqa_generative", "vqa_generative_accuracy")):
        if getattr(objectives, name) > 0 and everyone_answers:
            metrics[key] = answer_accuracy([x for p in parts for x in p[2][name]], everyone_answers)
    return metrics


class Trainer:
    """Runs optimizer steps on a DeepSpeed engine, logging, evaluating and checkpointing."""

    def __init__(
        self,
        runner: StepRunner,
        config: TrainConfig,
        parallel: ParallelState,
        batches: Iterator[Batch],
        eval_batches: Callable[[], Iterable[Batch]],
        writer: MetricsWriter,
        state: TrainState,
        marker: dict[str, Any],
        lock: Optional[RunLock] = None,
        stop: Optional[StopRequest] = None,
        watchdog: Optional[Watchdog] = None,
        tokenizer: Optional[Tokenizer] = None,
        position: Optional[DataPosition] = None,
    ) -> None:
        self.runner = runner
        self.engine = runner.engine
        self.config = config
        self.parallel = parallel
        self.batches = batches
        self.eval_batches = eval_batches
        """Makes a fresh stream of this rank's share of the evaluation set."""
        self.writer = writer
        self.state = state
        self.marker = marker
        """What each checkpoint's completion marker records besides the step (layout, config)."""
        self.lock = lock
        """checkpoint.dir's run lock, on the rank that holds it."""
        self.line_start: Optional[int] = state.step
        """The step this run started from, until its first save has set aside newer tags."""
        self.position = position or DataPosition(state.batches_consumed, dict(state.data_position))
        """This rank's data position (its own streams up to date)."""
        self.keys_here: list[int] = []
        """Digests of the sample keys of this step's micro-batches (``data.check_keys_every``)."""
        self.bad_here: Counter[str] = Counter()
        """Bad samples this rank's loader skipped since the last sync, by reason."""
        self.bad_shards_here: Counter[str] = Counter()
        """The same, by shard."""
        self.seen_here = 0
        """Raw samples this rank's loader read since the last sync."""
        self.eval_samples = 0
        """Pairs scored by the last evaluation."""
        self.placeholder = placeholder_batch(config.data)
        self.stop = stop
        """Preemption signals, checked by all ranks together after every step."""
        self.watchdog = watchdog
        """Ends this rank if it stops making progress (a hung peer); told of every step, save and eval batch."""
        self.device = device()
        global_batch = config.micro_batch_size * config.grad_accum_steps * parallel.dp_size
        self.flops_per_sample = model_flops_per_sample(
            config.model, global_batch=global_batch, micro_batch=config.micro_batch_size
        ).training
        self.image_tokens = image_tokens(config.model.image)
        self.tokens_here = 0
        """Image and (unpadded) text tokens this rank has trained on since the last log line."""
        self.epoch_here = 0
        """The pass over its shards that this rank's latest batch came from."""
        self.timer = StepTimer(synchronize if self.device.type != "cpu" else None, ("data_wait", *runner.phases))
        self.extras = config.model.data_extras
        """The batch fields the model reads beyond images and captions."""
        self.tokenizer = tokenizer
        """Decodes generated captions and answers for their evaluation."""

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum_steps`` micro batches; returns the mean local loss.

        Every rank (every pipeline stage too) takes the step's micro-batches from its loader, so
        all ranks of a data-parallel rank keep the same data position.
        """
        upcoming = self.state.step + 1
        self._progress(f"training step {upcoming}")
        self.timer.start(upcoming % self.config.logging.log_interval == 0 or upcoming == self.config.train_steps)
        micro_batches = []
        for _ in range(self.config.grad_accum_steps):
            with self.timer.phase("data_wait"):
                batch = next(self.batches)
            self.position.advance(batch)
            self.epoch_here = int(batch.get("epoch", 0))
            self.bad_here.update(batch.get("bad", {}))
            self.bad_shards_here.update(batch.get("bad_shards", {}))
            self.seen_here += int(batch.get("seen", 0))
            self.keys_here.append(keys_digest(batch["keys"]))
            self.tokens_here += int(batch["text_mask"].sum()) + self.image_tokens * len(batch["keys"])
            micro_batches.append(_inputs(batch, self.extras))
        loss = self.runner.train_step(micro_batches, self.timer.phase)
        self.state.step += 1
        every = self.config.data.check_keys_every
        if every and self.state.step % every == 0:
            check_same_keys(self.keys_here, self.parallel, self.state.step)
        self.keys_here = []
        return loss

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
                self._log_training(interval_loss / interval_steps, throughput)
                interval_loss, interval_steps = 0.0, 0
            if cfg.eval_interval and step % cfg.eval_interval == 0 and not last:
                self.evaluate()
            saved = step % cfg.checkpoint.save_interval == 0 or last
            if saved:
                path = self.save()
            signum = self.stop.agreed() if self.stop is not None and not last else None
            if signum is not None:
                if not saved:
                    path = self.save()
                raise Preempted(signum, step, str(path))
        return self.evaluate()

    def _log_training(self, local_loss: float, throughput: Throughput) -> None:
        """Scalars of the interval since the last call: loss, LR, gradient norm, throughput
        (samples, tokens, TFLOP/s, MFU), the last step's phases, memory, skipped samples."""
        samples_per_second = throughput.rate()
        loss_sum, tokens = _dp_sum([local_loss, float(self.tokens_here)], self.parallel)
        self._sync_bad_data()
        epoch = _dp_max(self.epoch_here, self.parallel)
        self.tokens_here = 0
        loss = loss_sum / self.parallel.dp_size
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        tflops = samples_per_second * self.flops_per_sample / 1e12
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/samples_per_second": samples_per_second,
            "train/tokens_per_second": tokens / throughput.elapsed if throughput.elapsed > 0 else 0.0,
            "train/tflops": tflops,
            "train/samples_skipped": self.state.samples_skipped,
            "data/samples_seen": self.state.samples_seen,
            "data/bad_fraction": self.state.samples_skipped / max(self.state.samples_seen, 1),
            **{f"data/bad_{reason}": count for reason, count in self.state.bad_data.items()},
            "data/epoch": float(epoch),
            "memory/host_max_rss_gb": host_max_rss_gb(),
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scale = loss_scale(self.engine)
        if scale is not None:  # fp16's dynamic loss scale
            scalars["train/loss_scale"] = scale
        peak = self.config.logging.peak_tflops
        if peak > 0:
            scalars["train/mfu"] = tflops / (peak * self.parallel.world_size)
        objective_losses = getattr(self.runner, "objective_losses", {})
        if len(objective_losses) > 1:  # each objective's own loss, averaged over data-parallel ranks (last step)
            names = sorted(objective_losses)
            values = _dp_sum([objective_losses[name] for name in names], self.parallel)
            scalars.update({f"train/loss_{name}": value / self.parallel.dp_size for name, value in zip(names, values)})
        if self.timer.enabled:
            scalars.update({f"time/{name}_ms": 1e3 * value for name, value in self.timer.seconds.items()})
        if self.device.type == "cuda":
            scalars["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.writer.scalars(scalars, self.state.step)
        remaining = self.config.train_steps - self.state.step
        eta = remaining / throughput.steps_per_second if throughput.steps_per_second > 0 else float("inf")
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  %.3f TFLOP/s  eta %s",
            self.state.step,
            self.config.train_steps,
            loss,
            lr,
            samples_per_second,
            tflops,
            _duration(eta),
        )

    def _progress(self, doing: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(doing)

    def evaluate(self) -> dict[str, float]:
        doing = f"evaluating at step {self.state.step}"
        metrics, self.eval_samples = evaluate_retrieval(
            self.runner, self.eval_batches(), self.parallel, self.placeholder, lambda: self._progress(doing), self.extras
        )
        model = self.engine.module
        generates = isinstance(model, MultiModalTransformer) and (model.decoder is not None or model.config.objectives.vqa > 0)
        if generates and self.tokenizer is not None:
            metrics.update(
                evaluate_generation(
                    model, self.engine, self.eval_batches(), self.parallel, self.placeholder, self.tokenizer,
                    lambda: self._progress(doing),
                )  # fmt: skip
            )
        self.writer.scalars({f"eval/{name}": value for name, value in metrics.items()}, self.state.step)
        self.writer.flush()
        log.info(
            "eval at step %d over %d pairs: %s",
            self.state.step,
            self.eval_samples,
            "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
        )
        return metrics

    def _sync_state(self) -> None:
        """Bring the data position and bad-data counts of every data-parallel rank into ``state`` (collective)."""
        streams: dict[int, dict[str, Any]] = {}
        for part in _dp_gather(self.position.streams, self.parallel):
            streams.update(part)
        self.state.batches_consumed = self.position.batches
        self.state.data_position = dict(sorted(streams.items()))
        self._sync_bad_data()

    def _sync_bad_data(self) -> None:
        """Add every data-parallel rank's bad-data counts since the last sync to ``state``, then stop
        the run if the bad fraction passed ``data.max_bad_fraction`` (collective: all ranks agree)."""
        reasons = list(BAD_REASONS)
        sums = _dp_sum([float(self.seen_here)] + [float(self.bad_here[r]) for r in reasons], self.parallel)
        shards: Counter[str] = Counter(self.state.bad_shards)
        for part in _dp_gather(dict(self.bad_shards_here), self.parallel):
            shards.update(part)
        state = self.state
        state.samples_seen += int(sums[0])
        new = {reason: int(count) for reason, count in zip(reasons, sums[1:]) if count}
        state.bad_data = dict(sorted((Counter(state.bad_data) + Counter(new)).items()))
        state.samples_skipped += sum(new.values())
        state.bad_shards = dict(shards.most_common(KEPT_BAD_SHARDS))
        self.seen_here = 0
        self.bad_here.clear()
        self.bad_shards_here.clear()
        check_bad_fraction(self.config.data, state)

    def save(self) -> Path:
        self._progress(f"saving the checkpoint of step {self.state.step}")
        if self.lock is not None:
            self.lock.check()  # another run took checkpoint.dir over: never write into its checkpoints
        if self.line_start is not None:
            if self.parallel.rank == 0:
                self._set_aside_abandoned_line()
            self.line_start = None
        self._sync_state()
        client_state = {
            "train_state": asdict(self.state),
            "config": to_dict(self.config),
            UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(
                self.config.model.text.vocab_size, [name for name, _ in self.engine.module.named_parameters()]
            ),
        }
        # This rank's random streams (dropout draws from them), for an exact resume; the same on every
        # data-parallel rank, so DeepSpeed keeping data-parallel rank 0's client state loses nothing.
        client_state["rng_state"] = {
            "device": self.device.type,
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "tensor_parallel": get_rng_tracker().get_states(),
        }
        path = save_checkpoint(
            self.engine,
            self.config.checkpoint.dir,
            self.state.step,
            client_state,
            self.config.checkpoint.keep_last,
            self.marker,
        )
        self.writer.flush()
        log.info("saved checkpoint %s", path)
        return path

    def _set_aside_abandoned_line(self) -> None:
        resumed = self.line_start or 0
        moved = set_aside_abandoned(self.config.checkpoint.dir, resumed)
        if moved:
            log.warning(
                "this run continues from step %d, so the later checkpoints in checkpoint.dir (%s) belong to an "
                "abandoned line; moved them to %s, where --resume auto never looks (load one by its path, "
                "or delete them)",
                resumed,
                ", ".join(path.name for path in moved),
                moved[0].parent,
            )


def check_bad_fraction(cfg: DataConfig, state: TrainState) -> None:
    """Stop (RuntimeError) once the bad fraction of the samples read passed ``data.max_bad_fraction``.

    A shard that ended early counts as many read and bad samples as its index says it lost (one
    without an index).
    """
    read = max(state.samples_seen, state.samples_skipped)
    if read < cfg.bad_data_min_samples or state.samples_skipped <= cfg.max_bad_fraction * read:
        return
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(state.bad_data.items(), key=lambda kv: -kv[1]))
    raise RuntimeError(
        f"{state.samples_skipped} of {read} training samples read were bad ({state.samples_skipped / read:.1%} > "
        f"data.max_bad_fraction={cfg.max_bad_fraction}): {reasons}. Worst shards: {bad_summary(state.bad_shards)}. "
        "Check them with tools/inspect_shards.py, fix or drop them (or raise data.max_bad_fraction), then resume"
    )


def check_same_keys(digests: list[int], parallel: ParallelState, step: int) -> None:
    """Every rank of a model-parallel group (the tensor- and pipeline-parallel peers of one
    data-parallel rank) must have trained step ``step`` on the same samples (collective).

    Raises:
        RuntimeError: naming the ranks whose keys differ.
    """
    if parallel.tp_size * parallel.pp_size == 1:
        return
    mine = torch.tensor(digests, dtype=torch.int64)  # (micro-batches,)
    gathered = [torch.empty_like(mine) for _ in range(parallel.tp_size * parallel.pp_size)]
    dist.all_gather(gathered, mine, group=parallel.model_parallel_group)
    differing = [index for index, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        ranks = dist.get_process_group_ranks(parallel.model_parallel_group)
        raise RuntimeError(
            f"step {step}: the tensor/pipeline-parallel peers of data-parallel rank {parallel.dp_rank} trained on "
            f"different samples (ranks {[ranks[i] for i in differing]} differ from rank {ranks[0]}): their loaders "
            "must be built with the data-parallel rank, not the global rank"
        )


def _summary(metrics: dict[str, float]) -> str:
    """The held-out metrics beyond image-text retrieval, for the console:
    ``audio->text R@1 0.650, ..., caption BLEU-4 23.3, VQA accuracy 0.900, ...``."""
    parts = [
        f"{name[: -len('_R@1')].replace('_to_', '->')} R@1 {value:.3f}"
        for name, value in sorted(metrics.items())
        if name.endswith("_R@1") and name not in ("text_to_image_R@1", "image_to_text_R@1")
    ]
    if "caption_BLEU-4" in metrics:
        parts.append(f"caption BLEU-4 {metrics['caption_BLEU-4']:.1f}")
    for name, label in (("vqa_accuracy", "VQA accuracy"), ("vqa_generative_accuracy", "generated-answer VQA accuracy")):
        if name in metrics:
            parts.append(f"{label} {metrics[name]:.3f}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m20s``, ``42s``."""
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _rank_hosts(world_size: int) -> str:
    """``node1 (ranks 0-1), node2 (ranks 2-3)``: where the ranks run (collective)."""
    hosts: list[Any] = [socket.gethostname()]
    if world_size > 1:
        hosts = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return ", ".join(
        f"{host} (rank {r[0]})" if len(r) == 1 else f"{host} (ranks {', '.join(map(str, r))})" for host, r in ranks.items()
    )


def _setup_logging(rank: int) -> None:
    # DeepSpeed calls these torch collectives under their old names on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def run_pretraining(
    config: TrainConfig,
    ds_config_path: str,
    resume: str = "auto",
    restart_data: bool = False,
    init_from: Optional[Path] = None,
) -> dict[str, float]:
    """Train ``config`` on every rank of the current launch; returns the final eval metrics.

    Every check that needs no process group runs first (:func:`megamm.preflight.preflight`);
    then rank 0 takes ``checkpoint.dir``'s run lock, released however the run ends. A start
    that fails leaves the checkpoint and TensorBoard directories as they were. On SIGTERM or
    SIGUSR1 (preemption) every rank finishes its step, the step is checkpointed, and
    :class:`~megamm.engine.Preempted` is raised; during start-up (before the first batch is
    requested) the signal ends the process at once, as nothing new is there to save. ``restart_data``: on resume, read the training
    data from its beginning instead of continuing the checkpoint's data position (which a
    changed data stream is refused).

    ``init_from`` (fine-tuning, ``launchers/finetune.py``): a checkpoint whose weights start the
    run, with a fresh optimizer, schedule, step counter and data stream. The run evaluates them
    at step 0 before training. Once the run has checkpoints of its own, it resumes those instead.
    """
    info = launch_info()
    _setup_logging(info.rank)
    plan = preflight(config, ds_config_path, resume, info, restart_data, init_from)
    lock = RunLock(config.checkpoint.dir).acquire() if info.rank == 0 else None
    stop = StopRequest()  # installed once there is training to checkpoint (see _train)
    try:
        return _train(config, plan, info, lock, stop)
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()


def _build_model(
    config: TrainConfig, parallel: ParallelState, ds_config: Optional[dict[str, Any]] = None
) -> torch.nn.Module:
    """The dual encoder, or this stage's layers of its pipeline form; the same weights either way.

    Built in :func:`~megamm.engine.model_construction` for ``ds_config``: under ZeRO-3 each rank
    keeps only its partition of every parameter as it is built (collective then).
    """
    torch.manual_seed(config.seed)
    model: torch.nn.Module
    with model_construction(ds_config, parallel):
        if parallel.pp_size > 1:
            model = MultiModalPipeline(
                config.model, parallel, config.parallel.pipeline_partition,
                sequence_parallel=config.parallel.sequence_parallel,
            )  # fmt: skip
        else:
            model = MultiModalTransformer(config.model, parallel, sequence_parallel=config.parallel.sequence_parallel)
    # Dropout's random streams (megamm.parallel.random), seeded once the weights are drawn: the default
    # one alike on a tensor-parallel group's ranks, each rank's own for the tensor-parallel regions,
    # both offset by 100 per pipeline stage (as Megatron does) so that stages do not repeat masks.
    model_parallel_seed(config.seed + 100 * parallel.pp_rank, parallel.tp_rank, device())
    model.set_activation_checkpointing(config.parallel.activation_checkpointing)  # type: ignore[operator]
    local = sum(full_numel(p) for p in model.parameters())
    sharded = sum(full_numel(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    counts = torch.tensor([local + (parallel.tp_size - 1) * sharded], dtype=torch.float64)
    if parallel.pp_size > 1:
        dist.all_reduce(counts, group=parallel.pp_group)  # every stage's layers
        stages = ", ".join(f"{first}-{stop - 1}" for first, stop in model.stage_layers())  # type: ignore[operator]
        log.info("pipeline: %d stages of layers %s (parallel.pipeline_partition=%s)", parallel.pp_size, stages,
                 config.parallel.pipeline_partition)
    log.info(
        "model: %.2fM parameters (%.2fM on each %s rank, before ZeRO)",
        counts.item() / 1e6,
        local / 1e6,
        "stage's tensor-parallel" if parallel.pp_size > 1 else "tensor-parallel",
    )
    held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
    if held:
        log.info("ZeRO-3 built the model partitioned: %.2fM parameters held on this rank", held / 1e6)
    return model


def _train(
    config: TrainConfig, plan: StartPlan, info: LaunchInfo, lock: Optional[RunLock], stop: StopRequest
) -> dict[str, float]:
    init_distributed(info, config.parallel.collective_timeout_s)
    check_shared_directory(config.checkpoint.dir)
    parallel = ParallelState.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
    zero_stage = plan.ds_config["zero_optimization"]["stage"]
    stages = f" pp={parallel.pp_size}" if parallel.pp_size > 1 else ""
    log.info("%d ranks: tp=%d%s dp=%d zero=%d", info.world_size, parallel.tp_size, stages, plan.dp_size, zero_stage)
    log.info("hosts: %s", _rank_hosts(info.world_size))
    if zero_stage != config.parallel.zero_stage:
        log.info(
            "parallel.zero_stage=%d: a single process has nothing to partition, so ZeRO stage %d runs "
            "(the same numbers, without ZeRO's per-module gather hooks)",
            config.parallel.zero_stage,
            zero_stage,
        )

    model = _build_model(config, parallel, plan.ds_config)
    if plan.init_from is not None:
        load_model_state(model, load_model_weights(plan.init_from, parallel.tp_rank))
        log.info("weights from %s (optimizer, schedule and step counter start afresh)", plan.init_from)
    engine = build_engine(model, config.optim, config.train_steps, plan.ds_config, parallel)
    runner = make_runner(engine, parallel)

    state = TrainState()
    rng_state: Optional[dict[str, Any]] = None  # the checkpoint's random streams, restored below
    if plan.resume_from is not None:
        client_state = load_checkpoint(engine, plan.resume_from)
        saved, rng_state = client_state["train_state"], client_state.get("rng_state")
        state = TrainState(**saved)
        log.info("resumed from %s at step %d", plan.resume_from, state.step)
        if plan.restart_data or ("data_position" not in saved and state.batches_consumed):
            why = "as --restart-data asks" if plan.restart_data else "an older megamm saved no per-stream position"
            log.warning("the training data starts again from its beginning (%s)", why)
            state.batches_consumed, state.data_position = 0, {}
    start = DataPosition(state.batches_consumed, dict(state.data_position))
    if plan.resume_from is not None and plan.streams_changed and state.data_position:
        epochs = next_epochs(state.data_position, len(plan.sources))
        log.warning(
            "the training data is read by %s streams now (data-parallel ranks x data.num_workers), not %s as when "
            "%s was saved: the saved stream positions do not carry over, so each source restarts at the next epoch "
            "boundary (%s); the rest of the interrupted epochs is not read",
            plan.data_stream["streams"], plan.saved_streams, plan.resume_from.name,
            ", ".join(f"{source.name}: epoch {epoch}" for source, epoch in zip(plan.sources, epochs)),
        )  # fmt: skip
        state.batches_consumed, state.data_position = 0, {}
        start = DataPosition(0, {}, epochs)

    # Nothing is written to the run's directories before this point.
    purge_step = state.step + 1 if plan.resume_from is not None else None  # hide a crashed attempt's later steps
    writer = MetricsWriter(config.logging.tensorboard_dir, active=parallel.rank == 0, purge_step=purge_step)
    resolved = yaml.safe_dump(to_dict(config))
    writer.text("config", "```yaml\n" + resolved + "```", state.step)  # the resolved config, in TensorBoard
    if parallel.rank == 0:
        with atomic_output(Path(config.logging.tensorboard_dir) / "config.yaml") as handle:
            handle.write(resolved.encode("utf-8"))
    extras, pairs = config.model.data_extras, config.model.data_pairs
    loader = build_train_loader(
        config.data, plan.tokenizer, parallel.dp_rank, parallel.dp_size, config.micro_batch_size, start, extras, pairs
    )
    marker = {
        **parallel_layout(info.world_size, parallel.tp_size, parallel.dp_size, parallel.pp_size),
        "config": to_dict(config),
        "tokenizer_sha256": plan.tokenizer.fingerprint,
        "data_stream": plan.data_stream,
    }

    def eval_batches() -> Iterable[Batch]:
        return iter_eval_batches(
            config.data, plan.tokenizer, config.micro_batch_size, parallel.dp_rank, parallel.dp_size, extras, pairs
        )

    batches = iter(loader)  # forks the loader workers, before the watchdog's threads exist
    # The saved random streams (dropout's) continue where the checkpoint left them; restored after
    # iter(loader), which draws its workers' base seed from the default generator, as at the start.
    if rng_state is not None and rng_state.get("device") == device().type:
        torch.set_rng_state(rng_state["cpu"].cpu())
        if rng_state.get("cuda") is not None:
            torch.cuda.set_rng_state(rng_state["cuda"].cpu(), device())
        get_rng_tracker().set_states({name: state.cpu() for name, state in rng_state["tensor_parallel"].items()})
    elif plan.resume_from is not None and (config.model.dropout or config.model.attention_dropout):
        log.warning("%s holds no random state for this device: dropout's streams start afresh", plan.resume_from)
    watchdog = Watchdog(config.parallel.collective_timeout_s, info.rank).start("waiting for the first batch")
    trainer = Trainer(
        runner, config, parallel, batches, eval_batches, writer, state, marker, lock, stop, watchdog, plan.tokenizer,
        start,
    )
    # Until here a stop signal ends the process at once (its default action): there is nothing new
    # to save, and a rank blocked in start-up (a rendezvous, a collective) would not see a flag.
    stop.install()
    try:
        if plan.init_from is not None:
            trainer.evaluate()  # the starting weights, at step 0
        metrics = trainer.fit() if state.step < config.train_steps else trainer.evaluate()
    finally:
        watchdog.stop()
        writer.close()
    if parallel.rank == 0:
        print(
            f"held-out retrieval: text->image R@1 {metrics['text_to_image_R@1']:.3f} "
            f"(chance {1.0 / trainer.eval_samples:.3f}), R@5 {metrics['text_to_image_R@5']:.3f}; "
            f"image->text R@1 {metrics['image_to_text_R@1']:.3f}",
            flush=True,
        )
        more = _summary(metrics)
        if more:
            print(f"held-out: {more}", flush=True)
        print(f"look at the run: tensorboard --logdir {config.logging.tensorboard_dir}", flush=True)
    dist.barrier()
    return metrics


__all__ = ["TrainState", "Trainer", "evaluate_retrieval", "run_pretraining"]
