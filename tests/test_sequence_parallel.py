"""Sequence parallelism and dropout in the whole model (gloo, CPU, fp32).

The reference is the single-process model (TP=1) built from the same seed, hence the same full
weights. At TP 2 and 4, ``MultiModalTransformer`` with ``sequence_parallel=True`` (dropout 0) must give
its loss, both embeddings and, on every rank, that rank's shard of every parameter's gradient
(replicated ones whole: LayerNorms and row-parallel biases, whose slices of the sequence each hold a
share of the gradient, included); so must the pipeline form (``layer_specs``, every layer run in turn in
one process per tensor-parallel rank). The image stream (65 tokens) is padded at both sizes, the text
stream (22 tokens) at TP 4 only.

Dropout at TP 2: the attention-probability masks are drawn from each rank's own random stream (each
holds other heads); the hidden-state masks from the stream the ranks share without sequence
parallelism (they hold the same activations) and from each rank's own with it (each holds another
slice of the sequence), as in Megatron. Activation checkpointing replays both streams, so a
checkpointed step equals a plain one with dropout on.

Each spawn runs every check of its kind and reports every failing one.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.config import ConfigError, ModelConfig, load_config
from megamm.model import MultiModalTransformer
from megamm.model.multimodal import weight_init
from megamm.parallel import ParallelState, get_rng_tracker, model_parallel_seed, shard_of
from megamm.parallel.random import TENSOR_PARALLEL_RNG
from tests.distributed import run_distributed

TOL = {"atol": 2e-5, "rtol": 1e-4}
BATCH = 4
TEXT_LENGTH = 22  # divisible by 2, not by 4: the text stream is padded at TP 4 only


def _config(*overrides: str) -> ModelConfig:
    length = f"model.text.max_length={TEXT_LENGTH}", f"data.max_text_length={TEXT_LENGTH}"
    return load_config("clip_tiny", [*length, *overrides]).model


def _inputs(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (B, C, S, S), ids (B, T), mask (B, T): the same on every rank."""
    generator = torch.Generator().manual_seed(2)
    size = config.image.image_size
    images = torch.randn(BATCH, config.image.channels, size, size, generator=generator)
    ids = torch.randint(0, config.text.vocab_size, (BATCH, TEXT_LENGTH), generator=generator)
    mask = torch.arange(TEXT_LENGTH)[None, :] < torch.tensor([[5], [22], [3], [17]])
    return images, ids, mask


def _model(config: ModelConfig, state: ParallelState, sequence_parallel: bool = False) -> MultiModalTransformer:
    torch.manual_seed(1)  # the base seed of every weight
    return MultiModalTransformer(config, state, sequence_parallel=sequence_parallel)


def _step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Loss, embeddings and every parameter's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out["loss"].backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return {"loss": out["loss"].detach(), "image_emb": out["image_emb"].detach(), "text_emb": out["text_emb"].detach(), "grads": grads}


def _own_shard(param: torch.nn.Parameter, full: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This rank's part of the full tensor ``full`` as ``param`` holds it."""
    if getattr(param, "tensor_model_parallel", False):
        return shard_of(full, state.tp_rank, state.tp_size, param.partition_dim, param.partition_stride)
    return full


def _assert_same(
    result: dict[str, Any], expected: dict[str, Any], params: dict[str, torch.nn.Parameter], state: ParallelState,
    whole: bool = True, **tol: float,
) -> None:  # fmt: skip
    """``result`` equals ``expected``: loss, embeddings and every gradient, which ``result`` holds as
    ``params`` do (this rank's shard, or whole) and ``expected`` whole (``whole``: the one-process
    reference's) or as ``result`` does."""
    tol = tol or TOL
    for key in ("loss", "image_emb", "text_emb"):
        torch.testing.assert_close(result[key], expected[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    assert sorted(result["grads"]) == sorted(expected["grads"])
    for name, grad in result["grads"].items():
        want = _own_shard(params[name], expected["grads"][name], state) if whole else expected["grads"][name]
        torch.testing.assert_close(grad, want, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")


class _Checks:
    """Runs named checks, collecting every failure, and raises them all at the end."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []

    def run(self, name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception:  # noqa: BLE001 - every failing check is reported
            self.failures.append(f"[rank {self.rank}] {name}:\n{traceback.format_exc()}")

    def finish(self) -> None:
        if self.failures:
            raise AssertionError("\n".join(self.failures))


# --------------------------------------------------------------------------------------------
# The whole model and its pipeline form under sequence parallelism vs one process


def _pipeline_names(layers: list[torch.nn.Module], config: ModelConfig) -> Iterator[tuple[int, str, str]]:
    """(layer index, parameter name in the layer, name in MultiModalTransformer) of every parameter."""
    from megamm.model.pipeline import BlockLayer, HeadLayer, ImageEmbeddingLayer, TemperatureLayer, TextEmbeddingLayer

    for index, layer in enumerate(layers):
        for name, _ in layer.named_parameters():
            if isinstance(layer, ImageEmbeddingLayer):
                plain = f"image_encoder.{name}"
            elif isinstance(layer, TextEmbeddingLayer):
                plain = f"text_encoder.{name}"
            elif isinstance(layer, BlockLayer):
                block = index - 2 if layer.modality == "image" else index - 3 - config.image.num_layers
                plain = f"{layer.modality}_encoder.transformer.layers.{block}.{name.removeprefix('block.')}"
            elif isinstance(layer, HeadLayer):
                if name.startswith("final_norm."):
                    plain = f"{layer.modality}_encoder.transformer.{name}"
                else:
                    plain = f"{layer.modality}_{name}"
            else:
                assert isinstance(layer, TemperatureLayer)
                plain = f"contrastive.{name}"
            yield index, name, plain


def _pipeline_step(config: ModelConfig, state: ParallelState, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, Any], dict[str, torch.nn.Parameter], dict[str, str]]:  # noqa: E501
    """The pipeline's layers (pp=1, run in turn) under sequence parallelism: results keyed by the
    plain model's parameter names."""
    from megamm.model.pipeline import ContrastiveLoss, layer_specs

    torch.manual_seed(1)
    specs = layer_specs(config, state, weight_init(config), sequence_parallel=True)
    layers = [spec.build() for spec in specs]
    stream: tuple[torch.Tensor, ...] = inputs
    for layer in layers:
        stream = layer(stream)
    image_emb, text_emb, _ = stream
    loss = ContrastiveLoss(state.dp_group)(stream, None)
    loss.backward()
    params, grads, names = {}, {}, {}
    for index, name, plain in _pipeline_names(layers, config):
        param = dict(layers[index].named_parameters())[name]
        params[plain], grads[plain], names[plain] = param, param.grad.clone(), plain
    result = {"loss": loss.detach(), "image_emb": image_emb.detach(), "text_emb": text_emb.detach(), "grads": grads}
    return result, params, names


def _whole_model_parity(rank: int, world: int, overrides: tuple[str, ...]) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    config = _config(*overrides)
    inputs = _inputs(config)
    expected = _step(_model(config, ParallelState.single()), inputs)
    checks = _Checks(rank)

    sp_model = _model(config, state, sequence_parallel=True)
    sp = _step(sp_model, inputs)
    params = dict(sp_model.named_parameters())

    def layout() -> None:
        # The sequence really is split, and the parameters that see one slice each are the marked ones.
        embedded = sp_model.image_encoder.embedding(inputs[0])
        padded = -(-65 // world) * world
        assert tuple(embedded.shape) == (BATCH, padded // world, config.image.hidden_size), embedded.shape
        marked = sorted(name for name, p in params.items() if getattr(p, "sequence_parallel", False))
        norms_and_row_biases = sorted(
            name for name in params
            if "norm." in name or name.endswith(("attn.out.bias", "mlp.down.bias"))
        )  # fmt: skip
        blocks = config.image.num_layers + config.text.num_layers
        assert marked == norms_and_row_biases and len(marked) == 6 * blocks + 4, marked

    checks.run("layout of the streams", layout)
    checks.run("sequence parallel == one process", lambda: _assert_same(sp, expected, params, state))
    if world == 2:
        plain_model = _model(config, state)
        plain = _step(plain_model, inputs)
        checks.run("tensor parallel == one process", lambda: _assert_same(plain, expected, params, state))
        checks.run("sequence parallel == tensor parallel", lambda: _assert_same(sp, plain, params, state, whole=False))

    def pipeline() -> None:
        result, pipe_params, names = _pipeline_step(config, state, inputs)
        assert sorted(names) == sorted(params), "the pipeline's parameters are the model's"
        _assert_same(result, expected, pipe_params, state)
        # the same operations as the plain model under sequence parallelism, in the same order
        _assert_same(result, sp, pipe_params, state, whole=False, atol=1e-6, rtol=1e-6)

    checks.run("pipeline layers under sequence parallelism == one process", pipeline)
    checks.finish()


OTHER_ATTENTION = (  # every kernel, causal text with rotary positions, kernels chosen per layer
    "model.text.attention.kind=local", "model.text.attention.window=3", "model.text.attention.global_tokens=1",
    "model.text.causal=true", "model.text.positions=rotary",
    "model.image.attention.layers=linear,block_sparse", "model.image.attention.block_size=16",
)  # fmt: skip


@pytest.mark.parametrize("tp, overrides", [(2, ()), (4, ()), (2, OTHER_ATTENTION)], ids=["tp2", "tp4", "tp2-kernels"])
def test_sequence_parallel_model_and_pipeline_layers_match_one_process(tmp_path, tp: int, overrides: tuple) -> None:
    run_distributed(_whole_model_parity, tp, tmp_path, overrides)


# --------------------------------------------------------------------------------------------
# Dropout: which random stream draws each mask, and activation checkpointing with dropout on


class _RandomSpy:
    """Records, at every dropout draw, the generator state it draws from and whether the
    tensor-parallel stream is the forked one (``get_rng_tracker().fork()``)."""

    def __init__(self) -> None:
        self.draws: dict[str, list[tuple[torch.Tensor, bool]]] = {"attention": [], "hidden": []}
        self._saved: dict[str, Any] = {}

    def _record(self, kind: str) -> None:
        state = torch.get_rng_state()
        forked = torch.equal(state, get_rng_tracker().states[TENSOR_PARALLEL_RNG])
        self.draws[kind].append((state, forked))

    def __enter__(self) -> "_RandomSpy":
        sdpa, dropout = F.scaled_dot_product_attention, F.dropout
        self._saved = {"scaled_dot_product_attention": sdpa, "dropout": dropout}

        def spy_sdpa(*args: Any, dropout_p: float = 0.0, **kwargs: Any) -> torch.Tensor:
            if dropout_p > 0:
                self._record("attention")
            return sdpa(*args, dropout_p=dropout_p, **kwargs)

        def spy_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
            if training and p > 0:
                self._record("hidden")
            return dropout(x, p, training, inplace)

        F.scaled_dot_product_attention, F.dropout = spy_sdpa, spy_dropout  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, function in self._saved.items():
            setattr(F, name, function)


def _gather(value: Any, state: ParallelState) -> list[Any]:
    everyone: list[Any] = [None] * state.tp_size
    dist.all_gather_object(everyone, value, group=state.tp_group)
    return everyone


def _dropout_streams(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    config = _config("model.dropout=0.2", "model.attention_dropout=0.2")
    inputs = _inputs(config)
    checks = _Checks(rank)
    blocks = config.image.num_layers + config.text.num_layers

    for sp in (False, True):
        tag = "sequence parallel" if sp else "tensor parallel"
        model = _model(config, state, sequence_parallel=sp)
        model_parallel_seed(1234, state.tp_rank)
        with _RandomSpy() as spy:
            out = model(*inputs)
        everyone = _gather((spy.draws, out["image_emb"].detach(), out["loss"].detach()), state)

        def attention() -> None:
            draws = [d["attention"] for d, _, _ in everyone]
            assert len(draws[0]) == blocks and all(len(d) == blocks for d in draws)
            for index in range(blocks):
                states = [d[index][0] for d in draws]
                assert all(d[index][1] for d in draws), "attention dropout outside the tensor-parallel stream"
                assert not any(torch.equal(states[0], other) for other in states[1:]), "two ranks drew the same masks"

        def hidden() -> None:
            draws = [d["hidden"] for d, _, _ in everyone]
            assert len(draws[0]) == 2 * blocks + 2 and all(len(d) == len(draws[0]) for d in draws)  # embeddings too
            for index in range(len(draws[0])):
                states, forked = [d[index][0] for d in draws], [d[index][1] for d in draws]
                if sp:  # each rank holds its own slice of the sequence: its own masks
                    assert all(forked) and not any(torch.equal(states[0], s) for s in states[1:])
                else:  # the ranks hold the same activations: the same masks, from the shared stream
                    assert not any(forked) and all(torch.equal(states[0], s) for s in states[1:])

        def replicated() -> None:
            # what leaves the encoders is alike on every rank: the ranks agree where they must
            for _, image_emb, loss in everyone[1:]:
                assert torch.equal(image_emb, everyone[0][1]) and torch.equal(loss, everyone[0][2])
            model.eval()
            with torch.no_grad():  # in evaluation, no dropout: the model without dropout's numbers
                evaluated = model(*inputs, compute_loss=True)["loss"]
            assert not torch.allclose(evaluated, out["loss"]), "dropout changed nothing in training"
            reference = _model(_config(), state, sequence_parallel=sp).eval()
            with torch.no_grad():
                torch.testing.assert_close(evaluated, reference(*inputs, compute_loss=True)["loss"], atol=0, rtol=0)

        checks.run(f"{tag}: attention-probability dropout", attention)
        checks.run(f"{tag}: hidden-state dropout", hidden)
        checks.run(f"{tag}: outputs replicated, no dropout in eval", replicated)

        def recompute(sp: bool = sp) -> None:
            results = []
            for enabled in (False, True):
                model = _model(config, state, sequence_parallel=sp)
                model.set_activation_checkpointing(enabled)
                model_parallel_seed(99, state.tp_rank)
                result = _step(model, inputs)
                result["next"] = (torch.rand(3), get_rng_tracker().get_states()[TENSOR_PARALLEL_RNG])
                results.append(result)
            plain, ckpt = results
            for key in ("loss", "image_emb", "text_emb"):
                torch.testing.assert_close(ckpt[key], plain[key], atol=0, rtol=0, msg=key)
            for name, grad in plain["grads"].items():
                torch.testing.assert_close(ckpt["grads"][name], grad, atol=1e-6, rtol=1e-6, msg=name)
            assert all(torch.equal(a, b) for a, b in zip(ckpt["next"], plain["next"])), "streams moved differently"

        checks.run(f"{tag}: activation checkpointing with dropout == without", recompute)
    checks.finish()


def test_dropout_masks_follow_megatron_streams_and_checkpointing_replays_them(tmp_path) -> None:
    run_distributed(_dropout_streams, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# One process: the config fields


@pytest.mark.parametrize("field", ["dropout", "attention_dropout"])
@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_dropout_must_be_a_probability(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.{field}={value} is not a probability in \[0, 1\)"):
        load_config("clip_tiny", [f"model.{field}={value}"])


def test_sequence_parallel_is_a_no_op_in_one_process() -> None:
    config = load_config("clip_tiny", ["parallel.sequence_parallel=true", "model.dropout=0.1"])
    assert config.parallel.sequence_parallel and config.model.dropout == 0.1
    assert not load_config("clip_tiny").parallel.sequence_parallel and load_config("clip_tiny").model.attention_dropout == 0.0
    model_config = _config()
    inputs = _inputs(model_config)
    single = ParallelState.single()
    plain, sp = _step(_model(model_config, single), inputs), _step(_model(model_config, single, True), inputs)
    for key in ("loss", "image_emb", "text_emb"):
        torch.testing.assert_close(sp[key], plain[key], atol=0, rtol=0)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(sp["grads"][name], grad, atol=0, rtol=0, msg=name)
