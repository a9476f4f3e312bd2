"""Whole-layer scores and removal: block influence is 1 - mean cosine(h_in, h_out) over real
tokens (checked against the model's own hidden states), the loss increase of skipping a block
equals the loss of the model with that block physically removed, and remove_layers_by removes
the lowest-scoring blocks and leaves a model that still generates."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deltatune.compress.layers import block_influence, loss_increase, remove_layers_by
from deltatune.errors import ConfigError
from deltatune.models.structure import remove_layers
from tests.compress.test_heads import cls_batches, cls_loss, lm_batches, lm_loss
from tests.conftest import tiny_bert, tiny_llama


def bert_with_four_layers():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
                        num_labels=2, attn_implementation="sdpa")
    return BertForSequenceClassification(config).eval()


def test_block_influence_matches_hidden_states_and_ignores_padding():
    model, batches = tiny_bert(), cls_batches()
    batches[0]["attention_mask"][1, 7:] = 0
    influence = block_influence(model, batches)
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for batch in batches:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool()
            for layer in range(2):
                cosine = F.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)
                sums[layer] += float(cosine[mask].sum())
                counts[layer] += int(mask.sum())
    expected = [1 - s / c for s, c in zip(sums, counts)]
    assert influence == pytest.approx(expected, abs=1e-5)


def test_skipping_a_block_gives_the_loss_of_removing_it():
    model, batches = tiny_llama(), lm_batches()
    increases = loss_increase(model, batches, lm_loss)
    with torch.no_grad():
        full = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
        for layer in range(2):
            shorter = copy.deepcopy(model)
            remove_layers(shorter, [layer])
            without = sum(float(lm_loss(shorter, b)) for b in batches) / len(batches)
            assert increases[layer] == pytest.approx(without - full, abs=1e-5)
    assert len(model.model.layers) == 2  # the blocks are back


@pytest.mark.parametrize("by", ["block-influence", "loss"])
def test_remove_layers_by_removes_the_lowest_scoring_blocks(by):
    model, batches = bert_with_four_layers(), cls_batches()
    result = remove_layers_by(model, batches, count=2, by=by, loss_fn=cls_loss)
    ranking = sorted(range(4), key=lambda index: result.scores[index])
    assert result.removed == sorted(ranking[:2])
    assert (result.layers_before, result.layers_after) == (4, 2)
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    per_layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
    assert result.parameters_before - result.parameters_after == 2 * per_layer
    with torch.no_grad():
        inputs = {k: v for k, v in batches[0].items() if k != "labels"}
        assert model(**inputs).logits.shape == (2, 2)


def test_llama_generates_after_layer_removal():
    model, batches = tiny_llama(), lm_batches()
    remove_layers_by(model, batches, count=1)
    prompt = batches[0]["input_ids"][:1]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, do_sample=False,
                                              use_cache=False))


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="loss_fn"):
        remove_layers_by(tiny_bert(), cls_batches(), 1, by="loss")
    with pytest.raises(ConfigError, match="count"):
        remove_layers_by(tiny_bert(), cls_batches(), 2)
    with pytest.raises(ConfigError, match="unknown"):
        remove_layers_by(tiny_bert(), cls_batches(), 1, by="random")
    with pytest.raises(ConfigError, match="batch"):
        block_influence(tiny_bert(), [])
