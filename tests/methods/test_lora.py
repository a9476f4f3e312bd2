"""LoRA on tiny models: identity at init, what trains, learning, merge/unmerge, adapter files,
rsLoRA and DoRA, Embedding and Conv2d layers, config files and user errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError, TargetNotFoundError
from deltatune.methods.lora import (LoraConfig, LoraConv2d, LoraEmbedding, LoraLayer,
                                    LoraLinear, apply_lora)
from tests.conftest import random_batch, tiny_bert, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyConvNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3)))


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def perturb(handle, std: float = 0.1, seed: int = 3) -> None:
    """Non-zero B (and random magnitudes for DoRA) so the delta actually changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in handle.layers.values():
            for name, tensor in layer.named_parameters():
                if name.startswith("base_layer"):
                    continue
                noise = torch.randn(tensor.shape, generator=generator) * std
                tensor.add_(noise)


def train_steps(handle, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=lr)
    handle.model.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(handle.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    handle.model.eval()
    return losses


# -- identity at init, trainability, learning ------------------------------------------------

@pytest.mark.parametrize("targets, wrapped", [(["q_proj", "v_proj"], 4), (LLAMA_TARGETS, 14),
                                              ("all-linear", 14)])
def test_forward_at_init_equals_base_exactly(targets, wrapped):
    model, batch = tiny_llama(), random_batch()
    with torch.no_grad():
        before = model(**batch).logits
    handle = apply_lora(model, LoraConfig(r=4, targets=targets))
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert len(handle.layers) == wrapped


def test_only_lora_parameters_are_trainable():
    model = tiny_llama()
    handle = apply_lora(model, LoraConfig(r=4, targets=LLAMA_TARGETS))
    trainable = handle.named_trainable_parameters()
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # per layer, r * (in + out): q, o 32->32; k, v 32->16; gate, up 32->64; down 64->32
    assert handle.parameter_counts().trainable == 2 * 4 * (64 + 64 + 48 + 48 + 96 * 3)


def test_base_weights_bit_identical_after_optimizer_steps():
    model, batch = tiny_llama(), random_batch()
    handle = apply_lora(model, LoraConfig(r=4, targets=LLAMA_TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(handle, batch, steps=3)
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert len(frozen) > 0 and all(not p.requires_grad for n, p in model.named_parameters()
                                   if "lora_" not in n)


def test_loss_decreases_on_a_tiny_task():
    # next token = previous + 1 (mod 16): learnable from the current token alone
    starts = torch.arange(4).view(4, 1) * 3
    input_ids = (starts + torch.arange(16).view(1, 16)) % 16
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    model = tiny_llama()
    handle = apply_lora(model, LoraConfig(r=8, alpha=16, targets=LLAMA_TARGETS))
    losses = train_steps(handle, batch, steps=40, lr=2e-2)
    # The frozen tied embeddings (std 0.02) cap the logits near +-0.7, so the reachable loss
    # is close to log(128) = 4.85: a 10% drop is most of what LoRA can do here.
    assert losses[-1] < 0.9 * losses[0], losses
    assert losses[-1] < min(losses[:10]), losses


def test_modules_to_save_and_biases_are_trainable_and_saved():
    model = tiny_bert()
    handle = apply_lora(model, LoraConfig(r=4, targets=["query", "value"], bias="lora_only",
                                          modules_to_save=["classifier"]))
    trainable = set(handle.named_trainable_parameters())
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    keys = set(handle.state_dict())
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias" in keys
    assert len(keys) == 2 * 2 * 3 + 2  # 2 layers x (query, value) x (A, B, bias) + classifier


def test_bias_all_trains_every_bias():
    model = tiny_bert()
    handle = apply_lora(model, LoraConfig(r=4, targets=["query", "value"], bias="all"))
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    trainable = handle.named_trainable_parameters()
    assert all(n in trainable for n in biases)
    keys = set(handle.state_dict())
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "base_model.model.bert.embeddings.LayerNorm.bias" in keys


def test_dropout_is_skipped_at_zero_and_off_in_eval():
    model, batch = tiny_llama(), random_batch()
    handle = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    assert all(layer.lora_dropout is None for layer in handle.layers.values())
    model2 = tiny_llama()
    handle2 = apply_lora(model2, LoraConfig(r=4, dropout=0.5))
    perturb(handle), perturb(handle2)
    with torch.no_grad():
        model.eval(), model2.eval()
        assert torch.equal(model(**batch).logits, model2(**batch).logits)
        model2.train()
        torch.manual_seed(0)
        first = model2(**batch).logits
        torch.manual_seed(1)
        assert not torch.allclose(first, model2(**batch).logits)


def test_registry_and_options_build_lora():
    config = deltatune.make_config("lora", {"r": 4, "targets": ["q_proj"]})
    assert isinstance(config, LoraConfig)
    handle = deltatune.apply(tiny_llama(), config)
    assert sorted(handle.layers) == ["model.layers.0.self_attn.q_proj",
                                     "model.layers.1.self_attn.q_proj"]


def test_exclude_and_all_linear_skip_head_and_modules_to_save():
    handle = apply_lora(tiny_llama(tie=False), LoraConfig(r=4, targets="all-linear",
                                                          exclude=["down_proj"]))
    assert "lm_head" not in handle.layers
    assert not any(n.endswith("down_proj") for n in handle.layers)
    assert len(handle.layers) == 12
    bert = apply_lora(tiny_bert(), LoraConfig(r=4, targets="all-linear",
                                              modules_to_save=["classifier"]))
    assert "classifier" not in bert.layers
    assert isinstance(bert.model.classifier, nn.Linear)


# -- merge / unmerge -------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_gives_same_outputs_and_removes_wrappers(use_dora):
    model, batch = tiny_llama(), random_batch()
    parameter_names = [n for n, _ in tiny_llama().named_parameters()]
    handle = apply_lora(model, LoraConfig(r=4, targets=LLAMA_TARGETS, use_dora=use_dora))
    perturb(handle)
    with torch.no_grad():
        unmerged = model(**batch).logits
        handle.merge()
        merged = model(**batch).logits
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == parameter_names
    assert (merged - unmerged).abs().max() < 1e-5
    assert not torch.allclose(merged, tiny_llama()(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("use_dora", [False, True])
def test_unmerge_restores_wrappers_and_weights(use_dora):
    model, batch = tiny_llama(), random_batch()
    handle = apply_lora(model, LoraConfig(r=4, targets=LLAMA_TARGETS, use_dora=use_dora))
    perturb(handle)
    weights = {n: layer.base_layer.weight.clone() for n, layer in handle.layers.items()}
    with torch.no_grad():
        before = model(**batch).logits
        handle.merge()
        handle.unmerge()
        after = model(**batch).logits
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 14
    for name, layer in handle.layers.items():
        drift = (layer.base_layer.weight - weights[name]).abs().max()
        assert drift == 0 if use_dora else drift < 1e-5
    assert (after - before).abs().max() < 1e-5
    assert len(handle.trainable_parameters()) == 14 * (3 if use_dora else 2)


def test_merge_with_tied_embedding_leaves_output_head_alone():
    model, batch = tiny_llama(tie=True), random_batch()
    head = model.lm_head.weight.clone()
    handle = apply_lora(model, LoraConfig(r=4, targets=["embed_tokens", "q_proj"]))
    perturb(handle)
    with torch.no_grad():
        unmerged = model(**batch).logits
        handle.merge()
        merged = model(**batch).logits
        assert torch.equal(model.lm_head.weight, head)
        handle.unmerge()
    assert (merged - unmerged).abs().max() < 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.base_layer.weight


# -- adapter files ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True},
                                     {"targets": "all-linear", "bias": "all"}])
def test_save_and_load_adapter_gives_identical_outputs(tmp_path, options):
    model, batch = tiny_llama(), random_batch()
    handle = apply_lora(model, LoraConfig(r=4, **options))
    train_steps(handle, batch, steps=2)
    with torch.no_grad():
        expected = model(**batch).logits
    deltatune.save_adapter(handle, tmp_path, base_model_name_or_path="tiny-llama")
    loaded = deltatune.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, expected)
    assert set(loaded.state_dict()) == set(handle.state_dict())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"


def test_save_and_load_bert_with_classifier(tmp_path):
    model, batch = tiny_bert(), random_batch()
    handle = apply_lora(model, LoraConfig(r=4, targets=["query", "value"],
                                          modules_to_save=["classifier"]))
    perturb(handle)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        expected = model(**batch).logits
    deltatune.save_adapter(handle, tmp_path)
    loaded = deltatune.load_adapter(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, expected)


def test_load_state_dict_into_merged_handle_keeps_it_merged():
    source = apply_lora(tiny_llama(), LoraConfig(r=4))
    perturb(source)
    target = apply_lora(tiny_llama(), LoraConfig(r=4))
    target.merge()
    target.load_state_dict(source.state_dict())
    assert target.merged
    batch = random_batch()
    with torch.no_grad():
        assert (target.model(**batch).logits - source.model(**batch).logits).abs().max() < 1e-5


def test_adapter_config_is_a_peft_lora_config():
    config = LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"],
                        modules_to_save=["classifier"], use_rslora=True)
    written = config.adapter_config()
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8
    assert written["lora_dropout"] == 0.1 and written["target_modules"] == ["q_proj", "v_proj"]
    assert written["use_rslora"] is True and written["use_dora"] is False
    assert written["fan_in_fan_out"] is False and written["init_lora_weights"] is True
    assert written["modules_to_save"] == ["classifier"] and written["bias"] == "none"
    assert LoraConfig.from_adapter_config(written) == config


def test_adapter_config_records_resolved_all_linear_and_task_type():
    handle = apply_lora(tiny_bert(), LoraConfig(r=4, targets="all-linear",
                                                modules_to_save=["classifier"]))
    written = handle.config.adapter_config()
    assert written["task_type"] == "SEQ_CLS"
    assert len(written["target_modules"]) == 2 * 6 + 1  # q,k,v,attn-out,inter,out x2 + pooler
    assert "classifier" not in written["target_modules"]
    assert LoraConfig(targets="all-linear").adapter_config()["target_modules"] == "all-linear"


def test_mixed_regex_and_plain_targets_become_one_peft_regex():
    config = LoraConfig(targets=[r".*layers\.0\.self_attn\.q_proj", "v_proj"])
    pattern = config.adapter_config()["target_modules"]
    assert isinstance(pattern, str)
    back = LoraConfig.from_adapter_config(config.adapter_config())
    handle = apply_lora(tiny_llama(), back)
    assert sorted(handle.layers) == ["model.layers.0.self_attn.q_proj",
                                     "model.layers.0.self_attn.v_proj",
                                     "model.layers.1.self_attn.v_proj"]


def test_from_adapter_config_reads_peft_regex_and_refuses_patterns():
    config = LoraConfig.from_adapter_config({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                             "target_modules": r".*\.(q|v)_proj"})
    assert config.targets == [r".*\.(q|v)_proj"] and config.alpha == 4
    assert len(apply_lora(tiny_llama(), config).layers) == 4
    with pytest.raises(ConfigError, match="rank_pattern.*not supported yet"):
        LoraConfig.from_adapter_config({"r": 2, "target_modules": ["q_proj"],
                                        "rank_pattern": {"q_proj": 4}})
    with pytest.raises(ConfigError, match="alpha_pattern.*not supported yet"):
        LoraConfig.from_adapter_config({"r": 2, "target_modules": ["q_proj"],
                                        "alpha_pattern": {"q_proj": 4}})


# -- rsLoRA and DoRA -------------------------------------------------------------------------

def test_rslora_scaling_is_alpha_over_sqrt_r():
    plain = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8))
    rs = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, use_rslora=True))
    assert plain.config.scaling == 2.0 and rs.config.scaling == 8 / math.sqrt(4)
    name = "model.layers.0.self_attn.q_proj"
    layer_plain, layer_rs = plain.layers[name], rs.layers[name]
    assert layer_rs.scaling == 4.0
    with torch.no_grad():
        for layer in (layer_plain, layer_rs):
            layer.lora_A.weight.copy_(torch.ones_like(layer.lora_A.weight))
            layer.lora_B.weight.fill_(0.01)
        x = torch.randn(3, 32)
        delta_plain = layer_plain(x) - layer_plain.base_layer(x)
        delta_rs = layer_rs(x) - layer_rs.base_layer(x)
    assert torch.allclose(delta_rs, delta_plain * 2.0, rtol=1e-5, atol=1e-6)


def test_dora_at_init_equals_base_and_magnitude_is_row_norm():
    model, batch = tiny_llama(), random_batch()
    with torch.no_grad():
        before = model(**batch).logits
    handle = apply_lora(model, LoraConfig(r=4, targets=LLAMA_TARGETS, use_dora=True))
    with torch.no_grad():
        assert (model(**batch).logits - before).abs().max() < 1e-5
    layer = handle.layers["model.layers.0.self_attn.k_proj"]
    assert layer.lora_magnitude_vector.shape == (16,)
    assert torch.allclose(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


def test_dora_linear_matches_its_formula():
    layer = LoraLinear(nn.Linear(6, 5), r=2, scaling=2.0, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
        x = torch.randn(4, 6)
        weight = layer.base_layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
        norm = weight.norm(dim=1)
        expected = x @ (layer.lora_magnitude_vector / norm).view(-1, 1).mul(weight).t() \
            + layer.base_layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert torch.allclose(F.linear(x, layer.merged_weight(), layer.base_layer.bias),
                              expected, atol=1e-5)


def test_dora_magnitude_gets_gradient_but_norm_is_detached():
    layer = LoraLinear(nn.Linear(6, 5), r=2, scaling=1.0, use_dora=True)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer(torch.randn(4, 6)).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


# -- Embedding and Conv2d --------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_lora(use_dora):
    model, batch = tiny_llama(tie=False), random_batch()
    with torch.no_grad():
        before = model(**batch).logits
    handle = apply_lora(model, LoraConfig(r=4, targets=["embed_tokens"], use_dora=use_dora))
    layer = handle.layers["model.embed_tokens"]
    assert isinstance(layer, LoraEmbedding)
    assert layer.lora_embedding_A.shape == (4, 128) and layer.lora_embedding_B.shape == (32, 4)
    with torch.no_grad():
        assert (model(**batch).logits - before).abs().max() < (1e-5 if use_dora else 1e-12)
    expected_keys = {"base_model.model.model.embed_tokens.lora_embedding_A",
                     "base_model.model.model.embed_tokens.lora_embedding_B"}
    if use_dora:
        expected_keys.add("base_model.model.model.embed_tokens.lora_magnitude_vector")
        assert layer.lora_magnitude_vector.shape == (32,)
    assert set(handle.state_dict()) == expected_keys
    perturb(handle)
    ids = batch["input_ids"]
    with torch.no_grad():
        manual = layer.base_layer.weight + layer.delta_weight()
        if not use_dora:
            assert torch.allclose(layer(ids), F.embedding(ids, manual), atol=1e-5)
        unmerged = model(**batch).logits
        handle.merge()
        assert (model(**batch).logits - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv2d_lora(use_dora):
    net, x = TinyConvNet(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    handle = apply_lora(net, LoraConfig(r=2, targets=["conv1", "conv2"], use_dora=use_dora))
    layer = handle.layers["conv2"]
    assert isinstance(layer, LoraConv2d)
    assert layer.lora_A.weight.shape == (2, 8, 3, 3) and layer.lora_A.stride == (2, 2)
    assert layer.lora_B.weight.shape == (8, 2, 1, 1)
    if use_dora:
        assert layer.lora_magnitude_vector.shape == (1, 8, 1, 1)
    with torch.no_grad():
        assert (net(x) - before).abs().max() < 1e-5
    perturb(handle)
    with torch.no_grad():
        features = torch.randn(2, 8, 8, 8)
        if not use_dora:
            manual = F.conv2d(features, layer.base_layer.weight + layer.delta_weight(),
                              layer.base_layer.bias, stride=2, padding=1)
            assert torch.allclose(layer(features), manual, atol=1e-5)
        unmerged = net(x)
        handle.merge()
        assert isinstance(net.conv2, nn.Conv2d) and not isinstance(net.conv2, LoraLayer)
        assert (net(x) - unmerged).abs().max() < 1e-5
        handle.unmerge()
        assert (net(x) - unmerged).abs().max() < 1e-5


# -- errors ----------------------------------------------------------------------------------

def test_unknown_target_lists_valid_names():
    with pytest.raises(TargetNotFoundError, match="q_proj") as error:
        apply_lora(tiny_llama(), LoraConfig(targets=["qproj"]))
    assert "'qproj'" in str(error.value)


def test_rank_larger_than_layer_names_layer_and_shape():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"r=20.*k_proj.*\(16, 32\)"):
        apply_lora(model, LoraConfig(r=20, targets=["q_proj", "k_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # unchanged on error
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options", [{"r": 0}, {"r": -2}, {"alpha": 0}, {"alpha": -1.0},
                                     {"dropout": 1.0}, {"dropout": -0.1}, {"bias": "some"},
                                     {"init": "pissa"}, {"targets": []}])
def test_invalid_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        LoraConfig(**options)


def test_unknown_modules_to_save_raises_before_changing_model():
    model = tiny_bert()
    with pytest.raises(TargetNotFoundError, match="head"):
        apply_lora(model, LoraConfig(targets=["query"], modules_to_save=["head"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_load_with_missing_or_unexpected_keys_raises():
    handle = apply_lora(tiny_llama(), LoraConfig(r=4))
    state = dict(handle.state_dict())
    missing_key = next(iter(state))
    incomplete = {k: v for k, v in state.items() if k != missing_key}
    with pytest.raises(AdapterFormatError, match="1 missing") as error:
        handle.load_state_dict(incomplete)
    assert missing_key in str(error.value)
    extra = {**state, "base_model.model.model.norm.lora_A.weight": torch.zeros(1)}
    with pytest.raises(AdapterFormatError, match="1 unexpected.*model.norm.lora_A"):
        handle.load_state_dict(extra)


def test_load_with_wrong_shape_names_module_and_shapes():
    handle = apply_lora(tiny_llama(), LoraConfig(r=4))
    state = dict(handle.state_dict())
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    state[key] = torch.zeros(8, 32)
    with pytest.raises(AdapterFormatError,
                       match=r"model\.layers\.1\.self_attn\.v_proj.*\(8, 32\).*\(4, 32\)"):
        handle.load_state_dict(state)


def test_conv_with_groups_is_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        apply_lora(net, LoraConfig(r=2, targets=["0"]))
