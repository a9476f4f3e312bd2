"""Whole models on a quantized base: which layers are quantized, every method that wraps linear
layers trains on them with the gradients of the dequantized model, the packed folder round-trips,
and loading from safetensors quantizes one tensor at a time (no dense linear weight survives)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deltatune.methods import apply, make_config
from deltatune.methods import lora_fused
from deltatune.models import load_model
from deltatune.quant import (QuantizedTensor, dequantize_model, quantize_model,
                             quantized_parameters)
from deltatune.models import save_quantized
from deltatune.quant.model import QUANT_META
from tests.conftest import random_batch, tiny_bert, tiny_llama
from tests.models.test_custom_code import model_folder  # noqa: F401 (fixture)
from tests.models.test_loading import bert_tokenizer

LINEAR_METHODS = [
    ("lora", {"targets": "all-linear", "r": 4}),
    ("lora", {"targets": "all-linear", "r": 4, "use_dora": True}),
    ("ia3", {}),
    ("adapter", {}),
]


def test_every_linear_but_the_head_is_quantized_and_bytes_shrink() -> None:
    model = tiny_llama()
    info = quantize_model(model, "nf4")
    quantized = quantized_parameters(model)
    assert len(quantized) == info.layers == 2 * 7
    assert not isinstance(model.lm_head.weight, QuantizedTensor)
    assert not isinstance(model.model.embed_tokens.weight, QuantizedTensor)
    assert info.packed_bytes < info.dense_bytes / 5


@pytest.mark.parametrize("method,options", LINEAR_METHODS)
def test_methods_train_on_a_quantized_base_like_on_its_dequantized_copy(method, options) -> None:
    model = tiny_llama()
    quantize_model(model, "nf4")
    handle = apply(model, make_config(method, options))
    with torch.no_grad():  # a trained-looking delta, so every term of the maths is exercised
        for parameter in handle.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = random_batch()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    quantized_grads = {n: p.grad.clone() for n, p in handle.named_trainable_parameters().items()}
    for parameter in handle.trainable_parameters():
        parameter.grad = None
    dequantize_model(model)
    dense_loss = model(**batch, labels=batch["input_ids"]).loss
    dense_loss.backward()
    assert torch.allclose(loss, dense_loss, atol=1e-6)
    for name, parameter in handle.named_trainable_parameters().items():
        assert torch.allclose(quantized_grads[name], parameter.grad, atol=1e-6), name


def test_lora_on_a_quantized_base_takes_the_fused_path(monkeypatch) -> None:
    model = tiny_llama()
    quantize_model(model, "nf4")
    handle = apply(model, make_config("lora", {"targets": "all-linear", "r": 4}))
    calls = []
    original = lora_fused.FusedLoraLinearFunction.apply
    monkeypatch.setattr(lora_fused.FusedLoraLinearFunction, "apply",
                        lambda *args: calls.append(1) or original(*args))
    batch = random_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert len(calls) == len(handle.layers)


def test_the_packed_folder_loads_back_with_identical_outputs(tmp_path, model_folder) -> None:
    loaded = load_model(str(model_folder), quantize="int4-g32")
    target = tmp_path / "packed"
    save_quantized(loaded.model, loaded.tokenizer, target)
    assert (target / QUANT_META).is_file()
    again = load_model(str(target))
    assert again.quantization["format"] == "int4-g32"
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, again.model(**batch).logits)
    packed = (target / "model.safetensors").stat().st_size
    dense = (model_folder / "model.safetensors").stat().st_size
    assert packed < dense


def test_streaming_load_equals_quantizing_after_load(model_folder) -> None:
    streamed = load_model(str(model_folder), quantize="nf4")
    assert streamed.quantization["streamed"] is True
    dense = load_model(str(model_folder))
    quantize_model(dense.model, "nf4")
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(streamed.model(**batch).logits, dense.model(**batch).logits)
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in streamed.model.parameters())
    dense_linears = [n for n, m in streamed.model.named_modules()
                     if isinstance(m, nn.Linear) and m is not streamed.model.lm_head
                     and not isinstance(m.weight, QuantizedTensor)]
    assert dense_linears == []


def test_streaming_load_of_a_classifier_initialises_its_new_head(tmp_path) -> None:
    folder = tmp_path / "bert"
    tiny_bert(num_labels=2).save_pretrained(folder)
    bert_tokenizer(tmp_path).save_pretrained(folder)
    loaded = load_model(str(folder), task="classification", num_labels=3, quantize="int8")
    head = loaded.model.classifier
    assert head.weight.shape == (3, 32) and not isinstance(head.weight, QuantizedTensor)
    assert torch.isfinite(head.weight).all() and head.weight.abs().sum() > 0
    assert isinstance(loaded.model.bert.encoder.layer[0].attention.self.query.weight,
                      QuantizedTensor)


def test_an_already_quantized_folder_refuses_another_format(tmp_path, model_folder) -> None:
    from deltatune.errors import ConfigError
    loaded = load_model(str(model_folder), quantize="nf4")
    save_quantized(loaded.model, loaded.tokenizer, tmp_path / "packed")
    with pytest.raises(ConfigError, match="already quantized as nf4"):
        load_model(str(tmp_path / "packed"), quantize="int8")
