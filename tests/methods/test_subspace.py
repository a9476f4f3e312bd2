"""Subspace training (intrinsic dimension): the Fastfood projection's maths (Hadamard, adjoint,
unit columns), identity at init, only z trains and the loss falls, what is projected, save/load on
a fresh base (including a new head's random start), disable/scale, merge, and errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import random_batch, tiny_bert, tiny_llama
from deltatune import apply, load_adapter, save_adapter
from deltatune.errors import AdapterFormatError, ConfigError, MergeNotSupportedError
from deltatune.methods import make_config
from deltatune.methods.fastfood import FastfoodProjection, hadamard_transform

LABELS = torch.tensor([0, 1])


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _train(handle, batch: dict, steps: int = 10, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        value = handle.model(**batch, labels=LABELS).loss
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


def _sylvester(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


@pytest.mark.parametrize("size", [1, 2, 64, 128, 2 ** 13])
def test_hadamard_transform_equals_the_sylvester_matrix(size):
    vector = torch.randn(size, dtype=torch.float64)
    expected = _sylvester(size) @ vector
    assert torch.allclose(hadamard_transform(vector), expected, atol=1e-9)


def test_hadamard_refuses_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.zeros(12))


@pytest.mark.parametrize("chunk_size", [1 << 20, 256])
def test_fastfood_transpose_is_the_adjoint_and_columns_are_unit_length(chunk_size):
    projection = FastfoodProjection(3000, 20, seed=4, chunk_size=chunk_size)
    assert projection.chunks == (1 if chunk_size > 3000 else 12)
    z, y = torch.randn(20), torch.randn(3000)
    assert math.isclose(float(projection.forward(z) @ y), float(z @ projection.transpose(y)),
                        rel_tol=1e-4)
    columns = torch.stack([projection.forward(e) for e in torch.eye(20)])
    assert columns.shape == (20, 3000)
    assert columns.norm(dim=1).sub(1).abs().max() < 0.1
    zz = torch.randn(20, requires_grad=True)
    (projection(zz) * y).sum().backward()
    assert torch.allclose(zz.grad, projection.transpose(y), atol=1e-5)


def test_the_same_seed_gives_the_same_projection_and_another_seed_does_not():
    z = torch.randn(8)
    first = FastfoodProjection(500, 8, seed=1).forward(z)
    assert torch.equal(first, FastfoodProjection(500, 8, seed=1).forward(z))
    assert not torch.allclose(first, FastfoodProjection(500, 8, seed=2).forward(z))


def test_starts_at_the_base_model_and_only_z_trains():
    model, batch = tiny_bert(), random_batch()
    before = _logits(model, batch)
    handle = apply(model, make_config("subspace", {"dimension": 16}))
    assert torch.equal(_logits(model, batch), before)
    assert [n for n, _ in handle.named_trainable_parameters().items()] == \
        ["deltatune_subspace.z"]
    assert handle.parameter_counts().trainable == 16
    losses = _train(handle, batch, steps=12)
    assert losses[-1] < losses[0] - 0.05
    assert not torch.allclose(_logits(model, batch), before)


def test_embeddings_are_left_out_unless_asked_and_exclude_is_honoured():
    model = tiny_bert()
    embeddings = model.get_input_embeddings().weight.numel()
    everything = sum(p.numel() for p in model.parameters())
    handle = apply(model, make_config("subspace", {"dimension": 4}))
    assert handle.config.projected_parameters == everything - embeddings
    with_embeddings = apply(tiny_bert(), make_config("subspace", {"dimension": 4,
                                                                  "include_embeddings": True}))
    assert with_embeddings.config.projected_parameters == everything
    excluded = apply(tiny_bert(), make_config("subspace", {"dimension": 4,
                                                           "exclude": ["encoder"]}))
    encoder = sum(p.numel() for p in tiny_bert().bert.encoder.parameters())
    assert excluded.config.projected_parameters == everything - embeddings - encoder


def test_tied_embeddings_of_a_language_model_are_projected_once_or_not_at_all():
    model = tiny_llama(tie=True)
    everything = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    handle = apply(model, make_config("subspace", {"dimension": 8}))
    assert handle.config.projected_parameters == everything - embeddings
    batch = random_batch()
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=1.0)
    first = None
    for _ in range(8):
        value = model(**batch, labels=batch["input_ids"]).loss
        first = value.item() if first is None else first
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert value.item() < first


def test_save_and_load_on_a_fresh_base_reproduces_outputs_including_the_new_head(tmp_path):
    model, batch = tiny_bert(seed=0), random_batch()
    handle = apply(model, make_config("subspace", {"dimension": 16, "projection_seed": 7,
                                                   "modules_to_save": ["classifier"]}))
    _train(handle, batch, steps=6)
    trained = _logits(model, batch)
    save_adapter(handle, tmp_path)
    # Another seed: the fresh model's classifier starts elsewhere, so the saved start matters.
    fresh = tiny_bert(seed=0)
    torch.manual_seed(123)
    nn.init.normal_(fresh.classifier.weight)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.config.projection_seed == 7
    assert torch.allclose(_logits(fresh, batch), trained, atol=1e-5)


def test_loading_on_another_architecture_is_refused(tmp_path):
    handle = apply(tiny_bert(), make_config("subspace", {"dimension": 8}))
    save_adapter(handle, tmp_path)
    with pytest.raises(AdapterFormatError, match="projects"):
        load_adapter(tiny_llama(), tmp_path)


def test_disabled_gives_the_base_exactly_and_scale_interpolates():
    model, batch = tiny_bert(), random_batch()
    base = _logits(model, batch)
    handle = apply(model, make_config("subspace", {"dimension": 16}))
    _train(handle, batch, steps=6)
    trained = _logits(model, batch)
    with handle.disabled():
        assert torch.equal(_logits(model, batch), base)
    with handle.scaled(0.0):
        assert torch.allclose(_logits(model, batch), base, atol=1e-6)
    with handle.scaled(0.5):
        half = _logits(model, batch)
    assert not torch.allclose(half, base) and not torch.allclose(half, trained)
    assert torch.equal(_logits(model, batch), trained)


def test_merge_folds_the_delta_into_plain_parameters():
    model, batch = tiny_bert(), random_batch()
    handle = apply(model, make_config("subspace", {"dimension": 16}))
    _train(handle, batch, steps=6)
    trained = _logits(model, batch)
    handle.merge()
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    assert torch.allclose(_logits(model, batch), trained, atol=1e-6)
    with pytest.raises(MergeNotSupportedError):
        handle.unmerge()


@pytest.mark.parametrize("options,match", [
    ({"dimension": 0}, "positive integer"),
    ({"dimension": 10 ** 9}, "larger than"),
    ({"dimension": 4, "exclude": ["bert", "classifier"]}, "no parameter is left"),
])
def test_bad_options_are_refused_with_the_fix(options, match):
    with pytest.raises(ConfigError, match=match):
        apply(tiny_bert(), make_config("subspace", options))
