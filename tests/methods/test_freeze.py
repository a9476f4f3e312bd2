"""Freezing: each mode trains exactly the intended tensors, everything else stays bit-identical
through training, a tied head is untied so the embeddings stay put, and the adapter (trained
tensors only) reloads exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.base import PEFT_PREFIX
from deltatune.methods.freeze import FreezeConfig, apply_freeze
from tests.conftest import random_batch, tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: handing work to a second thread costs more than the maths (20x on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

LABELS = torch.tensor([0, 1] * 4)


def _trainable(handle) -> set[str]:
    return set(handle.named_trainable_parameters())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_classifier(model: nn.Module, handle, steps: int = 30, lr: float = 3e-2) -> list[float]:
    # Eval mode: no dropout, so the loss curve of a fixed batch is deterministic.
    batch = random_batch(batch=8, length=12)
    optimizer = torch.optim.AdamW(handle.parameter_groups(lr, 0.1))
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=LABELS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_probe_trains_only_the_head_and_loss_drops() -> None:
    model = tiny_bert()
    before = _snapshot(model)
    handle = apply_freeze(model, FreezeConfig(mode="probe"))
    assert _trainable(handle) == {"classifier.weight", "classifier.bias"}
    losses = _train_classifier(model, handle)
    assert losses[-1] < 0.7 * losses[0]
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == name.startswith("classifier"), name


def test_probe_of_tied_head_unties_it_and_keeps_embeddings() -> None:
    model = tiny_llama()
    batch = random_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    embeddings = model.get_input_embeddings().weight.detach().clone()
    handle = apply_freeze(model, FreezeConfig(mode="probe"))
    assert handle.untied
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert _trainable(handle) == {"lm_head.weight"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)  # untying changes nothing yet
    optimizer = torch.optim.AdamW(handle.parameter_groups(1e-2, 0.1))
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.lm_head.weight, embeddings)
    assert "lm_head" in handle.describe() and "untied" in handle.describe()


def test_probe_without_untying_trains_the_shared_tensor() -> None:
    model = tiny_llama()
    handle = apply_freeze(model, FreezeConfig(mode="probe", untie_tied_head=False))
    assert not handle.untied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _trainable(handle) == {"model.embed_tokens.weight"}
    assert "tied" in handle.describe()


def test_bottom_freezes_embeddings_and_lowest_blocks() -> None:
    model = tiny_bert()
    before = _snapshot(model)
    handle = apply_freeze(model, FreezeConfig(mode="bottom", num_frozen_layers=1))
    trainable = _trainable(handle)
    assert trainable == {n for n in before if n.startswith(("bert.encoder.layer.1.",
                                                            "bert.pooler.", "classifier."))}
    _train_classifier(model, handle, steps=3)
    for name, parameter in model.named_parameters():
        if name not in trainable:
            assert torch.equal(parameter, before[name]), name
    assert not torch.equal(model.bert.encoder.layer[1].output.dense.weight,
                           before["bert.encoder.layer.1.output.dense.weight"])


def test_bottom_on_decoder_trains_top_block_norm_and_untied_head() -> None:
    model = tiny_llama()
    handle = apply_freeze(model, FreezeConfig(mode="bottom", num_frozen_layers=1))
    trainable = _trainable(handle)
    assert "lm_head.weight" in trainable and "model.norm.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable
    assert not any(n.startswith("model.layers.0.") for n in trainable)
    assert all(f"model.layers.1.{s}" in " ".join(trainable) for s in ("self_attn", "mlp"))


def test_bottom_with_all_blocks_frozen_trains_only_the_top() -> None:
    model = tiny_bert()
    handle = apply_freeze(model, FreezeConfig(mode="bottom", num_frozen_layers=2))
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in _trainable(handle)} == \
        {"bert.pooler", "classifier.weight", "classifier.bias"}


def test_modules_mode_trains_named_modules() -> None:
    model = tiny_bert()
    handle = apply_freeze(model, FreezeConfig(mode="modules", train_modules=["LayerNorm",
                                                                             "classifier"]))
    trainable = _trainable(handle)
    assert trainable == {n for n, _ in model.named_parameters()
                         if ".LayerNorm." in n or n.startswith("classifier.")}
    losses = _train_classifier(model, handle, steps=10)
    assert losses[-1] < losses[0]


def test_parameter_groups_skip_decay_for_bias() -> None:
    model = tiny_bert()
    handle = apply_freeze(model, FreezeConfig(mode="probe"))
    groups = handle.parameter_groups(1e-3, 0.1)
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decays[id(model.classifier.weight)] == 0.1
    assert decays[id(model.classifier.bias)] == 0.0


@pytest.mark.parametrize("options", [
    {"mode": "probe"},
    {"mode": "bottom", "num_frozen_layers": 1},
    {"mode": "modules", "train_modules": ["norm", "embed_tokens"]},
])
def test_save_and_load_round_trip(tmp_path, options: dict) -> None:
    model = tiny_llama()
    handle = deltatune.apply(model, make_config("freeze", options))
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    deltatune.save_adapter(handle, tmp_path)
    state = handle.state_dict()
    assert set(state) == {PEFT_PREFIX + n for n in _trainable(handle)}
    fresh = tiny_llama()
    deltatune.load_adapter(fresh, tmp_path)
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
        assert not torch.equal(tiny_llama()(**batch).logits, fresh(**batch).logits)


def test_load_with_missing_tensor_fails_clearly() -> None:
    handle = apply_freeze(tiny_bert(), FreezeConfig(mode="probe"))
    state = handle.state_dict()
    state.pop(PEFT_PREFIX + "classifier.bias")
    with pytest.raises(AdapterFormatError, match="missing"):
        apply_freeze(tiny_bert(), FreezeConfig(mode="probe")).load_state_dict(state)


def test_too_many_frozen_layers() -> None:
    with pytest.raises(ConfigError, match=r"num_frozen_layers=5 .* 2 blocks.*0\.\.2"):
        apply_freeze(tiny_bert(), FreezeConfig(mode="bottom", num_frozen_layers=5))


def test_unknown_module_pattern_lists_names() -> None:
    with pytest.raises(TargetNotFoundError, match="'attn_out'.*classifier"):
        apply_freeze(tiny_bert(), FreezeConfig(mode="modules", train_modules=["attn_out"]))


def test_probe_without_any_head_fails_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetNotFoundError, match="head_patterns"):
        apply_freeze(model, FreezeConfig(mode="probe"))


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="unknown mode"):
        FreezeConfig(mode="top")
    with pytest.raises(ConfigError, match="train_modules"):
        FreezeConfig(mode="modules")
    with pytest.raises(ConfigError, match=">= 0"):
        FreezeConfig(mode="bottom", num_frozen_layers=-1)
    with pytest.raises(ConfigError, match="block_module"):
        apply_freeze(nn.Sequential(nn.Linear(4, 4)), FreezeConfig(mode="bottom"))


def test_describe_lists_what_trains() -> None:
    handle = apply_freeze(tiny_bert(), FreezeConfig(mode="bottom", num_frozen_layers=1))
    text = handle.describe()
    assert "bert.encoder.layer.1" in text and "classifier" in text
    assert "bert.encoder.layer.0" not in text and "bert.embeddings" not in text
    assert f"{handle.parameter_counts().trainable:,}" in text
