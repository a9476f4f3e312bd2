"""Hypernetwork LoRA: only the generator trains, the model starts equal to the base, the trainable
count does not grow with depth (but for one embedding row per block), layers of different shapes
get their own heads, and the generated LoRA exports as an ordinary adapter that deltatune's LoRA
and PEFT load with the same outputs; merge matches too."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.errors import ConfigError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.hyperlora import HyperLoraConfig, apply_hyperlora, export_lora
from tests.conftest import random_batch, tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: handing work to a second thread costs more than the maths (20x on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SMALL = {"r": 4, "alpha": 8, "layer_embedding_dim": 8, "hidden_dim": 16}


def _llama(num_layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _perturb(handle, scale: float = 0.1) -> None:
    # Moves B's heads off zero so the generated LoRA is not a no-op.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_only_the_generator_trains_and_init_equals_base() -> None:
    model = tiny_llama()
    batch = random_batch()
    reference = _logits(model, batch)
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL))
    assert all(n.startswith("hyperlora_generator.") for n in handle.named_trainable_parameters())
    assert handle.parameter_counts().trainable == sum(
        p.numel() for p in model.hyperlora_generator.parameters())
    assert torch.equal(_logits(model, batch), reference)
    assert sorted(handle.layers) == [f"model.layers.{i}.self_attn.{k}_proj"
                                     for i in (0, 1) for k in ("q", "v")]


def test_per_shape_heads_for_grouped_query_attention() -> None:
    handle = apply_hyperlora(tiny_llama(), HyperLoraConfig(**SMALL))
    generator = handle.generator
    assert set(generator.head_A) == {"32x32", "16x32"}  # q: 32 outputs, v: 16 (GQA)
    factor_A, factor_B = generator.generate(handle.layers["model.layers.1.self_attn.v_proj"].slot)
    assert factor_A.shape == (4, 32) and factor_B.shape == (16, 4)
    assert torch.count_nonzero(factor_B) == 0 and torch.count_nonzero(factor_A) > 0


def test_trainable_count_independent_of_depth() -> None:
    counts = {n: apply_hyperlora(_llama(n), HyperLoraConfig(**SMALL)).parameter_counts().trainable
              for n in (2, 4, 8)}
    # Only the layer-embedding table grows: one row of layer_embedding_dim per block.
    assert counts[4] - counts[2] == 2 * SMALL["layer_embedding_dim"]
    assert counts[8] - counts[2] == 6 * SMALL["layer_embedding_dim"]


def test_training_lowers_loss_and_keeps_base_bit_identical() -> None:
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL))
    batch = random_batch(batch=4, length=16)
    optimizer = torch.optim.AdamW(handle.parameter_groups(1e-2, 0.1))
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    for name, parameter in model.named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in before:
            assert torch.equal(parameter, before[original]), name


def test_encoder_targets_and_classification_head() -> None:
    model = tiny_bert()
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL, targets=["query", "value"],
                                                    modules_to_save=["classifier"]))
    assert len(handle.layers) == 4
    assert {n.split(".")[0] for n in handle.named_trainable_parameters()} == \
        {"hyperlora_generator", "classifier"}
    batch = random_batch(batch=8, length=12)
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW(handle.parameter_groups(1e-2, 0.0))
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_llama()
    handle = deltatune.apply(model, make_config("hyperlora", SMALL))
    _perturb(handle)
    deltatune.save_adapter(handle, tmp_path)
    fresh = tiny_llama()
    deltatune.load_adapter(fresh, tmp_path)
    batch = random_batch()
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    assert not torch.equal(_logits(tiny_llama(), batch), _logits(fresh, batch))


@pytest.mark.parametrize("build, options", [
    (tiny_llama, {}),
    (tiny_bert, {"targets": ["query", "value"], "modules_to_save": ["classifier"]}),
])
def test_export_loads_in_deltatune_lora_and_peft(tmp_path: Path, build, options: dict) -> None:
    model = build()
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL, **options))
    _perturb(handle)
    batch = random_batch()
    expected = _logits(model, batch)
    export_lora(handle, tmp_path)

    lora_model = build()
    lora_handle = deltatune.load_adapter(lora_model, tmp_path)
    assert lora_handle.config.method_name == "lora"
    assert torch.allclose(_logits(lora_model, batch), expected, atol=1e-5)

    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    assert torch.allclose(_logits(peft_model, batch), expected, atol=1e-5)
    assert not torch.allclose(_logits(build(), batch), expected, atol=1e-5)


def test_merge_and_unmerge() -> None:
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL))
    _perturb(handle)
    batch = random_batch()
    unmerged = _logits(model, batch)
    handle.merge()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(_logits(model, batch), unmerged, atol=1e-5)
    handle.unmerge()
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.base_layer.weight, original,
                          atol=1e-6)
    assert torch.allclose(_logits(model, batch), unmerged, atol=1e-6)


def test_task_embedding_selects_the_generated_lora(tmp_path: Path) -> None:
    model = tiny_llama()
    handle = apply_hyperlora(model, HyperLoraConfig(**SMALL, num_tasks=2))
    _perturb(handle)
    batch = random_batch()
    handle.set_task(0)
    task0 = _logits(model, batch)
    handle.set_task(1)
    task1 = _logits(model, batch)
    assert not torch.allclose(task0, task1)
    handle.export_lora(tmp_path, task=0)
    exported = tiny_llama()
    deltatune.load_adapter(exported, tmp_path)
    assert torch.allclose(_logits(exported, batch), task0, atol=1e-5)
    with pytest.raises(ConfigError, match="num_tasks=2"):
        handle.set_task(2)


def test_bad_options() -> None:
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        apply_hyperlora(tiny_bert(), HyperLoraConfig(**SMALL))  # BERT calls them query/value
    with pytest.raises(ConfigError, match="larger than layer"):
        apply_hyperlora(tiny_llama(), HyperLoraConfig(r=64))
    with pytest.raises(ConfigError, match="positive integer"):
        HyperLoraConfig(r=0)
    with pytest.raises(ConfigError, match="num_tasks"):
        HyperLoraConfig(num_tasks=-1)
    with pytest.raises(ConfigError, match="valid options"):
        make_config("hyperlora", {"rank": 4})
