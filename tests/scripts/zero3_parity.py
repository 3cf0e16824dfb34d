"""Run under `deepspeed` (4 ranks: TP=2 x DP=2, ZeRO-3): train a few steps with megamm's engine
and, on every rank, the same model in one process with plain torch (AdamW, the same schedule,
gradient clipping and in-place logit-scale bound) on the same global batches. Rank 0 writes
both loss curves and final logit scales as JSON.

    deepspeed --num_gpus 4 tests/scripts/zero3_parity.py OUT.json [key=value overrides]
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from megamm.config import load_config
from megamm.engine import build_ds_config, build_engine, clamp_parameters, init_distributed, load_template
from megamm.engine.builder import parameter_groups, warmup_cosine
from megamm.model import MultiModalTransformer
from megamm.parallel import ParallelState

STEPS = 6


def global_batch(step: int, size: int, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    image_size, length = config.model.image.image_size, config.model.text.max_length
    images = torch.randn(size, 3, image_size, image_size, generator=generator)
    ids = torch.randint(4, config.model.text.vocab_size, (size, length), generator=generator)
    lengths = torch.randint(3, length + 1, (size, 1), generator=generator)
    mask = torch.arange(length)[None, :] < lengths
    return images, ids, mask


def reference_run(config, batch_size: int) -> tuple[list[float], list[float]]:
    """The same run in one process (no groups, torch AdamW and clipping): losses, gradient norms."""
    torch.manual_seed(config.seed)
    model = MultiModalTransformer(config.model, ParallelState.single())
    optim = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, optim.warmup_steps, config.train_steps, optim.min_lr_ratio)
    )
    losses, norms = [], []
    for step in range(STEPS):
        loss = model(*global_batch(step, batch_size, config))["loss"]
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip).item())
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # OpenCLIP's bound on the temperature, after the step
            model.contrastive.logit_scale.clamp_(max=config.model.logit_scale_max)
        losses.append(loss.item())
    return losses, norms, model.contrastive.logit_scale.item()


def main() -> None:
    out_path, *overrides = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    config = load_config("clip_tiny", ["parallel.tensor_parallel=2", "micro_batch_size=4", *overrides])
    init_distributed()
    parallel = ParallelState.initialize(config.parallel.tensor_parallel)
    torch.manual_seed(config.seed)
    model = MultiModalTransformer(config.model, parallel)
    ds_config = build_ds_config(load_template("ds_configs/zero3.json"), config, parallel.dp_size)
    engine = build_engine(model, config.optim, config.train_steps, ds_config, parallel)

    rows = config.micro_batch_size
    losses = []
    for step in range(STEPS):
        batch = global_batch(step, rows * parallel.dp_size, config)
        local = [t[parallel.dp_rank * rows : (parallel.dp_rank + 1) * rows] for t in batch]
        loss = engine(*local)["loss"]
        engine.backward(loss)
        engine.step()
        clamp_parameters(engine)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=parallel.dp_group)
        losses.append(mean.item() / parallel.dp_size)

    reference, reference_norms, reference_scale = reference_run(config, rows * parallel.dp_size)
    with deepspeed.zero.GatheredParameters([engine.module.contrastive.logit_scale]):
        scale = engine.module.contrastive.logit_scale.item()
    if parallel.rank == 0:
        result = {
            "zero3": losses,
            "reference": reference,
            "zero3_last_grad_norm": float(engine.get_global_grad_norm()),
            "reference_grad_norms": reference_norms,
            "zero3_logit_scale": scale,
            "reference_logit_scale": reference_scale,
        }
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    dist.barrier()


if __name__ == "__main__":
    main()
