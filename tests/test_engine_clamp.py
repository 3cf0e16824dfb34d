"""The logit scale's bound is applied to the optimizer's master copy at every ZeRO stage.

The skeleton only clamped in the forward pass: above the cap the gradient is zero, so a scale
carried past it by Adam's momentum stayed there for good. Here it starts above the cap; after
one step it must sit at the cap in the master copy and in the module, and later steps must move
it (random data pulls the scale down).
"""

from __future__ import annotations

import pytest
import torch

from megamm.config import load_config
from megamm.engine import build_engine, clamp_parameters
from megamm.model import MultiModalTransformer
from megamm.parallel import ParallelState
from tests.distributed import run_distributed

CAP = 4.0


def _full_value(engine, param: torch.nn.Parameter) -> tuple[float, float]:
    """(master copy, module copy) of a one-element parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            module = param.item()
    else:
        module = param.item()
    return (module if master is None else master.item()), module


def _clamp_run(rank: int, world: int, stage: int) -> None:
    import os

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # what DeepSpeed asks for
    config = load_config("clip_tiny", ["micro_batch_size=4", f"model.logit_scale_init={CAP + 1}",
                                  f"model.logit_scale_max={CAP}", "optim.warmup_steps=0"])
    parallel = ParallelState.initialize(tensor_parallel=1)
    torch.manual_seed(0)
    model = MultiModalTransformer(config.model, parallel)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine = build_engine(model, config.optim, 10, ds_config, parallel)
    scale = engine.module.contrastive.logit_scale
    generator = torch.Generator().manual_seed(rank)
    values = []
    for _ in range(3):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        ids = torch.randint(4, 200, (4, 24), generator=generator)
        loss = engine(images, ids, torch.ones(4, 24, dtype=torch.bool))["loss"]
        engine.backward(loss)
        engine.step()
        clamp_parameters(engine)
        values.append(_full_value(engine, scale))
    (master, module) = values[0]
    assert master == pytest.approx(CAP) and module == pytest.approx(CAP), values
    assert values[2][0] < CAP - 1e-5 and values[2][0] == pytest.approx(values[2][1]), values


@pytest.mark.parametrize("world, stage", [(1, 0), (2, 1), (2, 3)])
def test_logit_scale_is_clamped_in_the_master_copy(tmp_path, world: int, stage: int) -> None:
    run_distributed(_clamp_run, world, tmp_path, stage)
