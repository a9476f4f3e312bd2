"""Prompt tuning: only the soft prompt (and a classifier head) trains, every caller sees the
original sequence length, generation with a KV cache equals an uncached forward, and adapter
files go both ways with Hugging Face PEFT on a tiny Llama (causal LM) and a tiny BERT (SEQ_CLS)."""
from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune
from deltatune.errors import ConfigError, MergeNotSupportedError
from deltatune.methods.prompt import PromptTuningConfig
from tests.conftest import tiny_bert, tiny_llama
from tests.methods.virtual_token_helpers import (
    TOLERANCE, assert_generation_matches_peft, assert_left_padding_invariant,
    assert_peft_loads_our_adapter, assert_unchanged_except, assert_we_load_peft_adapter,
    causal_lm_batch, causal_lm_loss, classification_batch, classification_loss, cls_logits,
    lm_logits, snapshot, train_steps)

P = 4


class _Tokenizer:
    """Just enough of a tokenizer for init='text': one id per character, BOS first."""
    name_or_path = "char-tokenizer"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1] + [ord(c) % 100 + 2 for c in text]}


def _prompt_llama(**options) -> tuple[torch.nn.Module, deltatune.MethodHandle]:
    model = tiny_llama()
    return model, deltatune.apply(model, PromptTuningConfig(num_virtual_tokens=P, **options))


def test_only_the_soft_prompt_is_trainable():
    model, handle = _prompt_llama()
    assert list(handle.named_trainable_parameters()) == ["prompt_encoder.embedding.weight"]
    assert handle.parameter_counts().trainable == P * 32
    assert handle.config.task_type == "CAUSAL_LM" and handle.config.token_dim == 32


def test_seq_cls_also_trains_the_classifier_as_peft_does():
    model = tiny_bert()
    handle = deltatune.apply(model, PromptTuningConfig(num_virtual_tokens=P))
    assert sorted(handle.named_trainable_parameters()) == [
        "classifier.bias", "classifier.weight", "prompt_encoder.embedding.weight"]
    assert handle.config.task_type == "SEQ_CLS" and handle.config.modules_to_save == ["classifier"]


def test_causal_lm_training_moves_only_the_prompt_and_lowers_the_loss():
    model, handle = _prompt_llama()
    before = snapshot(model)
    losses = train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=10, learning_rate=0.2)
    # A random tiny Llama predicts nearly uniformly (ln 128 = 4.85); a soft prompt moves it a bit.
    assert losses[-1] < losses[0] - 0.03
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.",))
    assert not torch.equal(model.prompt_encoder.embedding.weight,
                           before["prompt_encoder.embedding.weight"])


def test_classification_training_moves_only_prompt_and_head():
    model = tiny_bert()
    handle = deltatune.apply(model, PromptTuningConfig(num_virtual_tokens=P))
    before = snapshot(model)
    classification_loss(model, classification_batch()).backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    train_steps(handle, classification_loss, classification_batch(), steps=3)
    assert_unchanged_except(model, before, allowed_prefixes=("prompt_encoder.", "classifier."))
    for name in ("prompt_encoder.embedding.weight", "classifier.weight"):
        assert not torch.equal(model.state_dict()[name], before[name])
    # No loss-decrease check here: as in PEFT, BERT's pooler now reads the first virtual token,
    # which a random tiny BERT barely lets attend to the text (see docs/methods/prompt.md).


def test_every_call_path_sees_the_original_length_and_the_prompt():
    base = tiny_llama()
    model, _ = _prompt_llama()
    batch = causal_lm_batch()
    with torch.no_grad():
        backbone_out = model.get_decoder()(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"],
                                           output_hidden_states=True)
        logits = lm_logits(model, batch)
    assert backbone_out.last_hidden_state.shape[1] == batch["input_ids"].shape[1]
    assert all(h.shape[1] == batch["input_ids"].shape[1] for h in backbone_out.hidden_states)
    torch.testing.assert_close(model.lm_head(backbone_out.last_hidden_state), logits,
                               atol=TOLERANCE, rtol=0)
    assert (logits - lm_logits(base, batch)).abs().max() > 1e-3  # the prompt is in effect
    positional = model.get_decoder()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(positional.last_hidden_state, backbone_out.last_hidden_state)


def test_the_training_objective_sees_the_original_length():
    from deltatune.models.fused_loss import fused_loss_installed
    from deltatune.train.objectives import CausalLMObjective

    model, handle = _prompt_llama()
    batch = causal_lm_batch()
    with fused_loss_installed(model) as installed:
        assert installed  # the backbone strips the virtual positions: the head fuses exactly
        chunked = CausalLMObjective()(model, batch).loss
    full = CausalLMObjective()(model, batch).loss
    torch.testing.assert_close(chunked, full, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(chunked, causal_lm_loss(model, batch), atol=TOLERANCE, rtol=0)


def test_save_load_round_trip_and_file_format(tmp_path):
    model, handle = _prompt_llama()
    train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=2)
    deltatune.save_adapter(handle, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_layers"]) == (P, 32, 2)
    assert config["prompt_tuning_init"] == "RANDOM"
    fresh = tiny_llama()
    loaded = deltatune.load_adapter(fresh, tmp_path)
    batch = causal_lm_batch()
    assert torch.equal(lm_logits(fresh, batch), lm_logits(model, batch))
    assert list(loaded.named_trainable_parameters()) == ["prompt_encoder.embedding.weight"]


def test_peft_loads_our_causal_lm_adapter(tmp_path):
    model, handle = _prompt_llama()
    assert_peft_loads_our_adapter(model, handle, "causal", tmp_path)


def test_peft_loads_our_classification_adapter(tmp_path):
    model = tiny_bert()
    handle = deltatune.apply(model, PromptTuningConfig(num_virtual_tokens=P))
    train_steps(handle, classification_loss, classification_batch(), steps=3)
    deltatune.save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()
    batch = classification_batch()
    peft_logits = cls_logits(peft_model, batch)
    torch.testing.assert_close(peft_logits, cls_logits(model, batch), atol=TOLERANCE, rtol=0)
    assert (peft_logits - cls_logits(tiny_bert(), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["causal", "classification"])
def test_we_load_a_peft_adapter(tmp_path, task):
    assert_we_load_peft_adapter(peft.PromptTuningConfig, task, tmp_path, num_virtual_tokens=P)


def test_greedy_generation_with_cache_matches_uncached_forward_and_peft(tmp_path):
    model, handle = _prompt_llama()
    assert_generation_matches_peft(model, handle, tmp_path)


def test_left_padded_generation_equals_unpadded():
    model, handle = _prompt_llama()
    assert_left_padding_invariant(model)


def test_text_init_repeats_or_truncates_the_text_tokens_as_peft():
    config = PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="ab")
    config.prepare(_Tokenizer())
    assert config.init_token_ids == [1, 99, 100]
    model = tiny_llama()
    handle = deltatune.apply(model, config)
    expected = model.model.embed_tokens(torch.tensor([1, 99, 100, 1, 99]))
    assert torch.equal(model.prompt_encoder.embedding.weight, expected)
    saved = handle.config.adapter_config()
    assert saved["prompt_tuning_init"] == "TEXT"
    assert saved["tokenizer_name_or_path"] == "char-tokenizer"
    short = PromptTuningConfig(num_virtual_tokens=2, init="text", init_token_ids=[7, 8, 9])
    handle = deltatune.apply(tiny_llama(), short)
    assert torch.equal(handle.model.prompt_encoder.embedding.weight,
                       handle.model.model.embed_tokens(torch.tensor([7, 8])))


def test_text_init_without_tokenizer_raises_a_clear_error():
    with pytest.raises(ConfigError, match="prepare"):
        deltatune.apply(tiny_llama(), PromptTuningConfig(init="text", init_text="hello"))
    with pytest.raises(ConfigError, match="init_text"):
        deltatune.apply(tiny_llama(), PromptTuningConfig(init="text"))


def test_sample_vocab_init_uses_vocabulary_embeddings():
    model, _ = _prompt_llama(init="sample_vocab")
    table = model.model.embed_tokens.weight
    for row in model.prompt_encoder.embedding.weight:
        assert (table == row).all(-1).any()


def test_merge_is_refused_with_the_alternative():
    _, handle = _prompt_llama()
    with pytest.raises(MergeNotSupportedError, match="nothing to fold"):
        handle.merge()
    assert handle.can_merge is False


def test_packed_rows_and_double_apply_are_refused():
    model, _ = _prompt_llama()
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ConfigError, match="packing"):
        model.get_decoder()(input_ids=torch.ones_like(packed), position_ids=packed)
    with pytest.raises(ConfigError, match="packing"):
        model.get_decoder()(input_ids=torch.ones_like(packed), attention_mask=torch.ones_like(
            packed), cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ConfigError, match="already"):
        deltatune.apply(model, PromptTuningConfig(num_virtual_tokens=P))


def test_remove_restores_the_base_model():
    base = tiny_llama()
    model, handle = _prompt_llama()
    handle.remove()
    batch = causal_lm_batch()
    assert torch.equal(lm_logits(model, batch), lm_logits(base, batch))
    assert not hasattr(model, "prompt_encoder")
