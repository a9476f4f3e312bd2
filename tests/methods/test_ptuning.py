"""P-tuning: the prompt encoder (MLP or LSTM) matches PEFT's module for module, only it (and a
classifier head) trains, its output is what is saved and loaded (folded), cached generation
equals an uncached forward, and adapter files go both ways with Hugging Face PEFT."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError, MergeNotSupportedError
from deltatune.methods.ptuning import PTuningConfig
from tests.conftest import tiny_bert, tiny_llama
from tests.methods.virtual_token_helpers import (
    TOLERANCE, assert_generation_matches_peft, assert_left_padding_invariant,
    assert_peft_loads_our_adapter, assert_unchanged_except, assert_we_load_peft_adapter,
    causal_lm_batch, causal_lm_loss, classification_batch, classification_loss, lm_logits,
    perturb_trainable, snapshot, train_steps)

P = 4


def _ptuning_llama(**options) -> tuple[torch.nn.Module, deltatune.MethodHandle]:
    model = tiny_llama()
    options = {"encoder_hidden_size": 16, **options}
    return model, deltatune.apply(model, PTuningConfig(num_virtual_tokens=P, **options))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_encoder_is_pefts_prompt_encoder(kind):
    options = {"encoder_reparameterization_type": kind, "encoder_num_layers": 2}
    model, handle = _ptuning_llama(**options)
    peft_model = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16, **options))
    peft_encoder = peft_model.prompt_encoder["default"]
    perturb_trainable(peft_model)
    assert sorted(model.prompt_encoder.state_dict()) == sorted(peft_encoder.state_dict())
    model.prompt_encoder.load_state_dict(peft_encoder.state_dict())
    with torch.no_grad():
        expected = peft_encoder(torch.arange(P).unsqueeze(0))[0]
        torch.testing.assert_close(model.prompt_encoder(), expected, atol=TOLERANCE, rtol=0)
    assert sorted(n.removeprefix("prompt_encoder.") for n in handle.named_trainable_parameters()) \
        == sorted(n for n, _ in peft_encoder.named_parameters())


def test_causal_lm_training_moves_only_the_encoder_and_lowers_the_loss():
    model, handle = _ptuning_llama()
    before = snapshot(model)
    losses = train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=10, learning_rate=0.05)
    # A random tiny Llama predicts nearly uniformly (ln 128 = 4.85); the prompt moves it a bit.
    assert losses[-1] < losses[0] - 0.03
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.",))


def test_classification_trains_encoder_and_head_only():
    model = tiny_bert()
    handle = deltatune.apply(model, PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    assert {n.split(".")[0] for n in handle.named_trainable_parameters()} == {
        "prompt_encoder", "classifier"}
    before = snapshot(model)
    train_steps(handle, classification_loss, classification_batch(), steps=3)
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.", "classifier."))


def test_saved_tensor_is_the_encoder_output_and_loading_folds_it(tmp_path):
    model, handle = _ptuning_llama(encoder_reparameterization_type="LSTM")
    train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=2)
    deltatune.save_adapter(handle, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(saved["prompt_embeddings"], model.prompt_encoder())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING"
    assert config["encoder_reparameterization_type"] == "LSTM"
    assert config["encoder_hidden_size"] == 16
    fresh = tiny_llama()
    loaded = deltatune.load_adapter(fresh, tmp_path)
    batch = causal_lm_batch()
    torch.testing.assert_close(lm_logits(fresh, batch), lm_logits(model, batch),
                               atol=TOLERANCE, rtol=0)
    assert list(loaded.named_trainable_parameters()) == ["prompt_encoder.embedding.weight"]


def test_wrong_shape_on_load_says_why(tmp_path):
    _, handle = _ptuning_llama()
    deltatune.save_adapter(handle, tmp_path)
    _, other = _ptuning_llama()
    with pytest.raises(AdapterFormatError, match="num_virtual_tokens"):
        other.load_state_dict({"prompt_embeddings": torch.zeros(P + 1, 32)})
    with pytest.raises(ConfigError, match="token_dim"):
        deltatune.apply(tiny_llama(), PTuningConfig(num_virtual_tokens=P, token_dim=64))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_peft_loads_our_causal_lm_adapter(tmp_path, kind):
    model, handle = _ptuning_llama(encoder_reparameterization_type=kind)
    assert_peft_loads_our_adapter(model, handle, "causal", tmp_path)


def test_peft_loads_our_classification_adapter(tmp_path):
    model = tiny_bert()
    handle = deltatune.apply(model, PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    assert_peft_loads_our_adapter(model, handle, "classification", tmp_path)


@pytest.mark.parametrize("task,kind", [("causal", "MLP"), ("causal", "LSTM"),
                                       ("classification", "MLP")])
def test_we_load_a_peft_adapter(tmp_path, task, kind):
    assert_we_load_peft_adapter(peft.PromptEncoderConfig, task, tmp_path, num_virtual_tokens=P,
                                encoder_hidden_size=16, encoder_reparameterization_type=kind)


def test_greedy_generation_with_cache_matches_uncached_forward_and_peft(tmp_path):
    model, handle = _ptuning_llama()
    assert_generation_matches_peft(model, handle, tmp_path)


def test_left_padded_generation_equals_unpadded():
    model, _ = _ptuning_llama()
    assert_left_padding_invariant(model)


def test_bad_options_and_merge_are_refused():
    with pytest.raises(ConfigError, match="MLP"):
        deltatune.apply(tiny_llama(), PTuningConfig(encoder_reparameterization_type="GRU"))
    _, handle = _ptuning_llama()
    with pytest.raises(MergeNotSupportedError, match="nothing to fold"):
        handle.merge()
