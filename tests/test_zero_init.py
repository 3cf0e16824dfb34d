"""Building the model partitioned under ZeRO-3 (``megamm.engine.model_construction``: zero.Init).

Four ranks, TP=2 x DP=2, ZeRO-3, fp32, gloo. The model built under zero.Init must be exactly the
TP=1 model of the same seed built plainly (every parameter gathered over the data-parallel group and
reassembled from its tensor-parallel shards: bitwise), and must train to the very losses of the same
layout built plainly. While it is built, no rank may hold more than its partitions plus one layer:
every time a parameter is registered, the whole (unpartitioned) parameter storage alive on the rank
is at most the largest module's own parameters, and afterwards each parameter is an empty
placeholder whose local partition is 1/dp of it. A plain build, for contrast, holds its whole
tensor-parallel shard. Fine-tuning's weight loading and the optimizer's parameter groups work on the
partitioned model too.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from megamm.config import load_config
from megamm.engine import build_ds_config, build_engine, load_model_state, model_construction
from megamm.engine.builder import parameter_groups
from megamm.model import MultiModalTransformer
from megamm.parallel import ParallelState
from tests.distributed import run_distributed

STEPS = 2
BATCH = 4


class HeldParameters:
    """Samples the parameter storage this process holds each time a module registers a parameter:
    whole tensors (``param.data``; a ZeRO-3 placeholder holds none) and ZeRO-3 partitions."""

    def __init__(self) -> None:
        self.params: dict[int, weakref.ref] = {}
        self.peak_whole = 0
        self.peak_total = 0

    def _sample(self, module: nn.Module, name: str, param: Any) -> None:
        if param is not None:
            self.params[id(param)] = weakref.ref(param)
        live = [ref() for ref in self.params.values()]
        live = [p for p in live if p is not None]
        whole = sum(p.data.untyped_storage().nbytes() for p in live)
        parts = sum(p.ds_tensor.untyped_storage().nbytes() for p in live if hasattr(p, "ds_tensor"))
        self.peak_whole = max(self.peak_whole, whole)
        self.peak_total = max(self.peak_total, whole + parts)

    def build(self, make: Callable[[], nn.Module]) -> nn.Module:
        handle = nn.modules.module.register_module_parameter_registration_hook(self._sample)
        try:
            return make()
        finally:
            handle.remove()


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _largest_layer_bytes(model: nn.Module) -> int:
    """The most bytes of parameters one module creates itself (a layer's whole weights)."""
    return max(sum(_numel(p) * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())


def _full_parameters(model: nn.Module, parallel: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter whole: gathered over the data-parallel group, then from its TP shards."""
    import deepspeed

    full = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            local = param.detach().clone()
        if getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(local) for _ in range(parallel.tp_size)]
            dist.all_gather(parts, local, group=parallel.tp_group)
            dim, stride = param.partition_dim, param.partition_stride
            blocks = [torch.cat([part.chunk(stride, dim)[b] for part in parts], dim) for b in range(stride)]
            local = torch.cat(blocks, dim)
        full[name] = local
    return full


def _train(model: nn.Module, config, ds_config: dict[str, Any], parallel: ParallelState) -> list[float]:
    engine = build_engine(model, config.optim, 10, ds_config, parallel)
    generator = torch.Generator().manual_seed(100 + parallel.dp_rank)  # TP peers read the same batch
    losses = []
    for _ in range(STEPS):
        images = torch.randn(BATCH, 3, 32, 32, generator=generator)
        ids = torch.randint(4, 200, (BATCH, 24), generator=generator)
        loss = engine(images, ids, torch.ones(BATCH, 24, dtype=torch.bool))["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _decayed(model: nn.Module) -> list[int]:
    groups = parameter_groups(model, 0.1)
    return sorted(_numel(p) for p in groups[0]["params"])


def _run(rank: int, world: int, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # what DeepSpeed asks for
    config = load_config("clip_tiny", [f"micro_batch_size={BATCH}", "optim.warmup_steps=0", "parallel.tensor_parallel=2",
                                  "parallel.zero_stage=3"])  # fmt: skip
    parallel = ParallelState.initialize(tensor_parallel=2)
    ds_config = build_ds_config({}, config, parallel.dp_size)
    assert ds_config["zero_optimization"]["stage"] == 3

    def build(seed: int, layout: ParallelState = parallel) -> nn.Module:
        torch.manual_seed(seed)
        return MultiModalTransformer(config.model, layout)

    reference = build(0, ParallelState.single())  # TP=1, one process's model
    expected = {name: param.detach() for name, param in reference.named_parameters()}

    zero_held, plain_held = HeldParameters(), HeldParameters()

    def partitioned() -> nn.Module:
        with model_construction(ds_config, parallel):
            return build(0)

    model = zero_held.build(partitioned)
    plain = plain_held.build(lambda: build(0))

    # Each rank holds its 1/dp partition of every parameter, the parameter an empty placeholder.
    partition_bytes = 0
    for name, param in model.named_parameters():
        assert param.numel() == 0, name
        assert param.ds_tensor.numel() == -(-param.ds_numel // parallel.dp_size), name
        assert dist.get_process_group_ranks(param.ds_process_group) == list(parallel.dp_group_ranks), name
        partition_bytes += param.ds_tensor.untyped_storage().nbytes()
    layer = _largest_layer_bytes(model)
    shard_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    assert zero_held.peak_whole <= layer, (zero_held.peak_whole, layer)
    assert zero_held.peak_total <= partition_bytes + layer, (zero_held.peak_total, partition_bytes, layer)
    assert plain_held.peak_whole == shard_bytes > 4 * layer  # the contrast: a plain build holds its whole shard

    # The same weights as one process's model, bitwise.
    full = _full_parameters(model, parallel)
    assert full.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(full[name], value), name
    assert _decayed(model) == _decayed(plain)

    # Fine-tuning's loading: another seed's partitioned model takes the plain model's weights.
    with model_construction(ds_config, parallel):
        other = build(1)
    load_model_state(other, plain.state_dict())
    partitioned_other = _full_parameters(other, parallel)
    for name, value in expected.items():
        assert torch.equal(partitioned_other[name], value), name
    del other

    losses = {"zero_init": _train(model, config, ds_config, parallel), "plain": _train(plain, config, ds_config, parallel)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(losses))


def test_zero_init_builds_the_tp1_model_partitioned_and_trains_to_the_same_losses(tmp_path: Path) -> None:
    run_distributed(_run, 4, tmp_path, str(tmp_path))
    for rank in range(4):
        losses = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(losses["zero_init"]) == STEPS
        for ours, theirs in zip(losses["zero_init"], losses["plain"]):
            assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), losses
