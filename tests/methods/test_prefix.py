"""Prefix tuning: key/value prefixes in every layer (GQA-shaped on Llama), only they (and a
classifier head) train, the reparameterising MLP is folded into the saved tensor, cached
generation equals an uncached forward, and adapter files go both ways with Hugging Face PEFT on
a tiny Llama (causal LM) and a tiny BERT (SEQ_CLS)."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import ConfigError, MergeNotSupportedError
from deltatune.methods.prefix import PrefixTuningConfig
from tests.conftest import tiny_bert, tiny_llama
from tests.methods.virtual_token_helpers import (
    TOLERANCE, assert_generation_matches_peft, assert_left_padding_invariant,
    assert_peft_loads_our_adapter, assert_unchanged_except, assert_we_load_peft_adapter,
    causal_lm_batch, causal_lm_loss, classification_batch, classification_loss, lm_logits,
    perturb_trainable, snapshot, train_steps)

P = 3
# tiny Llama: 2 layers, 2 key/value heads of dim 8 -> token_dim 16, flat width 2 * 2 * 16.
LLAMA_WIDTH = 64


def _prefix_llama(**options) -> tuple[torch.nn.Module, deltatune.MethodHandle]:
    model = tiny_llama()
    return model, deltatune.apply(model, PrefixTuningConfig(num_virtual_tokens=P, **options))


def test_prefixes_have_the_key_value_head_geometry():
    model, handle = _prefix_llama()
    assert list(handle.named_trainable_parameters()) == ["prompt_encoder.embedding.weight"]
    assert model.prompt_encoder.embedding.weight.shape == (P, LLAMA_WIDTH)
    assert (handle.config.token_dim, handle.config.num_attention_heads) == (16, 2)
    batch = causal_lm_batch()
    with torch.no_grad():
        cache = model.get_decoder()(input_ids=batch["input_ids"], use_cache=True).past_key_values
        flat = model.prompt_encoder.embedding.weight
    assert cache.get_seq_length() == P + batch["input_ids"].shape[1]
    # PEFT's layout of the flat width: (layer, key/value, head, head_dim).
    per_layer = flat.view(P, 2, 2, 2, 8)
    for layer in range(2):
        for index, stored in enumerate((cache.layers[layer].keys, cache.layers[layer].values)):
            expected = per_layer[:, layer, index].transpose(0, 1)  # (heads, p, head_dim)
            assert torch.equal(stored[0, :, :P], expected)


def test_projection_trains_through_the_mlp_and_leaves_the_base_alone():
    model, handle = _prefix_llama(prefix_projection=True, encoder_hidden_size=8)
    assert sorted(handle.named_trainable_parameters()) == [
        "prompt_encoder.embedding.weight", "prompt_encoder.transform.0.bias",
        "prompt_encoder.transform.0.weight", "prompt_encoder.transform.2.bias",
        "prompt_encoder.transform.2.weight"]
    before = snapshot(model)
    losses = train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=10, learning_rate=0.05)
    assert losses[-1] < losses[0] - 0.05
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.",))


def test_encoder_is_pefts_prefix_encoder():
    model, _ = _prefix_llama(prefix_projection=True, encoder_hidden_size=8)
    peft_model = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=8))
    perturb_trainable(peft_model)
    peft_encoder = peft_model.prompt_encoder["default"]
    model.prompt_encoder.load_state_dict(peft_encoder.state_dict())
    with torch.no_grad():
        expected = peft_encoder(torch.arange(P).unsqueeze(0))[0]
        torch.testing.assert_close(model.prompt_encoder(), expected, atol=TOLERANCE, rtol=0)


def test_classification_learns_a_tiny_task_with_only_prefix_and_head():
    model = tiny_bert()
    handle = deltatune.apply(model, PrefixTuningConfig(num_virtual_tokens=P,
                                                       prefix_projection=True))
    assert {n.split(".")[0] for n in handle.named_trainable_parameters()} == {
        "prompt_encoder", "classifier"}
    before = snapshot(model)
    batch = classification_batch()
    with torch.no_grad():
        initial = classification_loss(model.eval(), batch).item()
    train_steps(handle, classification_loss, batch, steps=12, learning_rate=0.05)
    with torch.no_grad():
        final = classification_loss(model.eval(), batch).item()
    assert final < initial / 2
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.", "classifier."))


def test_saved_tensor_is_the_projected_prefix_and_loading_folds_it(tmp_path):
    model, handle = _prefix_llama(prefix_projection=True, encoder_hidden_size=8)
    train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=2)
    deltatune.save_adapter(handle, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(saved["prompt_embeddings"], model.prompt_encoder())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is True
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (16, 2, 2)
    fresh = tiny_llama()
    loaded = deltatune.load_adapter(fresh, tmp_path)
    batch = causal_lm_batch()
    torch.testing.assert_close(lm_logits(fresh, batch), lm_logits(model, batch),
                               atol=TOLERANCE, rtol=0)
    assert list(loaded.named_trainable_parameters()) == ["prompt_encoder.embedding.weight"]
    assert fresh.prompt_encoder.embedding.weight.shape == (P, LLAMA_WIDTH)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_loads_our_causal_lm_adapter(tmp_path, projection):
    model, handle = _prefix_llama(prefix_projection=projection)
    assert_peft_loads_our_adapter(model, handle, "causal", tmp_path)


def test_peft_loads_our_classification_adapter(tmp_path):
    model = tiny_bert()
    handle = deltatune.apply(model, PrefixTuningConfig(num_virtual_tokens=P,
                                                       prefix_projection=True))
    assert_peft_loads_our_adapter(model, handle, "classification", tmp_path)


@pytest.mark.parametrize("task,projection", [("causal", False), ("causal", True),
                                             ("classification", True)])
def test_we_load_a_peft_adapter(tmp_path, task, projection):
    assert_we_load_peft_adapter(peft.PrefixTuningConfig, task, tmp_path, num_virtual_tokens=P,
                                prefix_projection=projection)


def test_greedy_generation_with_cache_matches_uncached_forward_and_peft(tmp_path):
    model, handle = _prefix_llama(prefix_projection=True)
    assert_generation_matches_peft(model, handle, tmp_path)


def test_left_padded_generation_equals_unpadded():
    model, _ = _prefix_llama()
    assert_left_padding_invariant(model)


def test_zero_init_and_refusals():
    model, handle = _prefix_llama(prefix_projection=True, init_weights="zero")
    with torch.no_grad():
        assert model.prompt_encoder().abs().max() == 0
    with pytest.raises(MergeNotSupportedError, match="nothing to fold"):
        handle.merge()
    with pytest.raises(ConfigError, match="init_weights"):
        deltatune.apply(tiny_llama(), PrefixTuningConfig(init_weights="ones"))
    checkpointed = tiny_llama()
    deltatune.apply(checkpointed, PrefixTuningConfig(num_virtual_tokens=P))
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        causal_lm_loss(checkpointed, causal_lm_batch())


def test_text_init_makes_the_untrained_model_see_that_text_before_its_input():
    text_ids = [5, 17, 42]
    model = tiny_llama()
    batch = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_real_text = model(input_ids=torch.cat([torch.tensor([text_ids] * 2), batch], 1),
                               use_cache=False).logits[:, len(text_ids):]
    deltatune.apply(model, PrefixTuningConfig(num_virtual_tokens=P, init_weights="text",
                                              init_token_ids=text_ids))
    with torch.no_grad():
        with_prefix = model(input_ids=batch).logits
    assert torch.allclose(with_prefix, with_real_text, atol=TOLERANCE)


def test_text_init_tokenizes_without_special_tokens_and_saves_a_peft_config(tmp_path):
    class Tokenizer:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) % 128 for c in text]}

    config = PrefixTuningConfig(num_virtual_tokens=P, init_weights="text", init_text="hello")
    config.prepare(Tokenizer())
    assert config.init_token_ids == [ord(c) % 128 for c in "hello"]
    model = tiny_bert()
    deltatune.save_adapter(deltatune.apply(model, config), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["init_weights"] is None
    assert peft.PeftModel.from_pretrained(tiny_bert(), tmp_path) is not None
    with pytest.raises(ConfigError, match="needs init_text"):
        PrefixTuningConfig(init_weights="text").validate()
    with pytest.raises(ConfigError, match="prefix_projection"):
        PrefixTuningConfig(init_weights="text", init_text="x", prefix_projection=True).validate()
    with pytest.raises(ConfigError, match="prepare"):
        deltatune.apply(tiny_llama(), PrefixTuningConfig(init_weights="text", init_text="x"))
