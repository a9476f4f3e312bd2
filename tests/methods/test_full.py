"""Full fine-tuning: everything trains, layer-wise learning-rate decay assigns the right rate to
every parameter, biases/norms get no weight decay, and the saved weights reload exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import ConfigError, MergeNotSupportedError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.base import PEFT_PREFIX
from deltatune.methods.full import FullFinetuneConfig, apply_full
from tests.conftest import random_batch, tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: handing work to a second thread costs more than the maths (20x on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lr_of(groups: list[dict], model: nn.Module) -> dict[str, float]:
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_every_parameter_trains() -> None:
    model = tiny_bert()
    handle = apply_full(model, FullFinetuneConfig())
    counts = handle.parameter_counts()
    assert counts.trainable == counts.total == sum(p.numel() for p in model.parameters())


def test_layerwise_decay_on_encoder() -> None:
    model = tiny_bert()  # 2 blocks: embeddings depth 0, blocks 1..2, pooler/classifier 3
    handle = apply_full(model, FullFinetuneConfig(layerwise_lr_decay=0.5))
    lrs = _lr_of(handle.parameter_groups(1e-3, 0.01), model)
    assert lrs["bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-3 * 0.125)
    assert lrs["bert.embeddings.LayerNorm.weight"] == pytest.approx(1e-3 * 0.125)
    assert lrs["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-3 * 0.25)
    assert lrs["bert.encoder.layer.1.output.dense.bias"] == pytest.approx(1e-3 * 0.5)
    assert lrs["bert.pooler.dense.weight"] == pytest.approx(1e-3)
    assert lrs["classifier.weight"] == pytest.approx(1e-3)


def test_layerwise_decay_on_decoder_with_tied_head() -> None:
    model = tiny_llama()
    handle = apply_full(model, FullFinetuneConfig(layerwise_lr_decay=0.8))
    lrs = _lr_of(handle.parameter_groups(1.0, 0.0), model)
    # The tied head is the embedding tensor: it gets the embedding's (slowest) rate.
    assert lrs["model.embed_tokens.weight"] == pytest.approx(0.8 ** 3)
    assert lrs["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.8 ** 2)
    assert lrs["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.8)
    assert lrs["model.norm.weight"] == pytest.approx(1.0)


def test_groups_cover_each_parameter_once_and_skip_decay_for_bias_and_norm() -> None:
    model = tiny_bert()
    handle = apply_full(model, FullFinetuneConfig(layerwise_lr_decay=0.9))
    groups = handle.parameter_groups(1e-3, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["bert.encoder.layer.0.attention.self.query.bias"])] == 0.0
    assert decay[id(params["bert.encoder.layer.0.output.LayerNorm.weight"])] == 0.0
    assert decay[id(params["bert.encoder.layer.0.output.dense.weight"])] == 0.05


def test_no_decay_means_one_learning_rate() -> None:
    model = tiny_llama()
    handle = apply_full(model, FullFinetuneConfig())
    assert {g["lr"] for g in handle.parameter_groups(3e-4, 0.1)} == {3e-4}


def test_loss_decreases_on_tiny_classification() -> None:
    model = tiny_bert().train()
    handle = apply_full(model, FullFinetuneConfig(layerwise_lr_decay=0.8))
    batch = random_batch(batch=8, length=12)
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW(handle.parameter_groups(3e-3, 0.01))
    losses = []
    for _ in range(25):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_load_round_trip(tmp_path) -> None:
    model = tiny_llama()
    handle = deltatune.apply(model, make_config("full", {"layerwise_lr_decay": 0.9}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    deltatune.save_adapter(handle, tmp_path)
    assert all(k.startswith(PEFT_PREFIX) for k in handle.state_dict())
    fresh = tiny_llama(seed=7)
    loaded = deltatune.load_adapter(fresh, tmp_path)
    assert loaded.config.layerwise_lr_decay == 0.9
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_load_on_other_architecture_fails_clearly(tmp_path) -> None:
    handle = apply_full(tiny_llama(), FullFinetuneConfig())
    deltatune.save_adapter(handle, tmp_path)
    with pytest.raises(deltatune.DeltatuneError, match="do not fit"):
        deltatune.load_adapter(tiny_bert(), tmp_path)


def test_merge_is_a_no_op_and_unmerge_explains() -> None:
    model = tiny_llama()
    handle = apply_full(model, FullFinetuneConfig())
    batch = random_batch()
    with torch.no_grad():
        before = model(**batch).logits
        handle.merge()
        assert handle.can_merge and handle.merged
        assert torch.equal(before, model(**batch).logits)
    with pytest.raises(MergeNotSupportedError, match="load the base model"):
        handle.unmerge()


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.out = nn.Linear(8, 2)


def test_block_module_option_for_custom_models() -> None:
    with pytest.raises(ConfigError, match="block_module"):
        apply_full(_Custom(), FullFinetuneConfig(layerwise_lr_decay=0.5))
    model = _Custom()
    handle = apply_full(model, FullFinetuneConfig(layerwise_lr_decay=0.5, block_module="stack"))
    lrs = _lr_of(handle.parameter_groups(1.0, 0.0), model)
    assert lrs["embed.weight"] == 0.5 ** 4
    assert lrs["stack.2.weight"] == 0.5
    assert lrs["out.weight"] == 1.0
    with pytest.raises(TargetNotFoundError, match="stack"):
        apply_full(_Custom(), FullFinetuneConfig(layerwise_lr_decay=0.5, block_module="nope"))


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5])
def test_bad_decay_is_rejected(decay: float) -> None:
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        FullFinetuneConfig(layerwise_lr_decay=decay)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="layerwise_lr_decay"):
        make_config("full", {"lr_decay": 0.9})
