"""FFN neuron scores and pruning: the activation score is the mean |activation| over real tokens
only, the gradient score is Σ_batches |Σ_tokens a·∂L/∂a| (checked against autograd on the
activation itself), pruning removes the lowest-scoring neurons per layer or globally and the
pruned model equals the original with those neurons zeroed."""
from __future__ import annotations

import copy

import pytest
import torch

from deltatune.compress.neurons import neuron_importance, prune_neurons
from deltatune.errors import ConfigError
from deltatune.models.structure import transformer_blocks
from tests.compress.test_heads import cls_batches, cls_loss, lm_batches, lm_loss
from tests.conftest import random_batch, tiny_bert, tiny_llama


def padded_batches() -> list[dict]:
    batches = lm_batches(2)
    for batch in batches:
        batch["attention_mask"][0, 6:] = 0
        batch["labels"][0, 6:] = -100
    return batches


def recorded_activations(model, batches) -> list[list[torch.Tensor]]:
    """Per layer, per batch: the down-projection inputs, [batch, tokens, neurons]."""
    recorded = [[] for _ in transformer_blocks(model)]
    handles = [block.ffn.output.register_forward_pre_hook(
        lambda module, args, layer=layer: recorded[layer].append(args[0].detach()))
        for layer, block in enumerate(transformer_blocks(model))]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return recorded


def test_activation_score_is_mean_absolute_activation_over_real_tokens():
    model, batches = tiny_llama(), padded_batches()
    scores = neuron_importance(model, batches, by="activation")
    for layer, activations in enumerate(recorded_activations(model, batches)):
        total = sum((a.abs() * b["attention_mask"][..., None]).sum((0, 1))
                    for a, b in zip(activations, batches))
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        torch.testing.assert_close(scores[layer], total / tokens)


def test_gradient_score_is_the_first_order_taylor_term():
    model, batches = tiny_llama(), padded_batches()
    scores = neuron_importance(model, batches, lm_loss, by="gradient")
    expected = [torch.zeros(64) for _ in range(2)]
    for batch in batches:
        kept = []
        handles = [block.ffn.output.register_forward_pre_hook(
            lambda module, args: kept.append(args[0]) or args[0].retain_grad())
            for block in transformer_blocks(model)]
        lm_loss(model, batch).backward()
        for handle in handles:
            handle.remove()
        for layer, activation in enumerate(kept):
            expected[layer] += (activation * activation.grad).sum((0, 1)).abs().detach()
        model.zero_grad()
    for layer in range(2):
        torch.testing.assert_close(scores[layer], expected[layer], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("build,batches,loss", [(tiny_llama, lm_batches, lm_loss),
                                                (tiny_bert, cls_batches, cls_loss)])
def test_per_layer_pruning_removes_the_lowest_and_equals_zeroing(build, batches, loss):
    model, data = build(), batches()
    reference = copy.deepcopy(model)
    scores = neuron_importance(model, data, by="activation")
    result = prune_neurons(model, data, loss, fraction=0.25, by="activation")
    assert result.neurons_before == 128 and result.neurons_after == 96
    for layer in range(2):
        assert result.removed[layer] == sorted(torch.argsort(scores[layer])[:16].tolist())
        with torch.no_grad():
            transformer_blocks(reference)[layer].ffn.output.weight[:, result.removed[layer]] = 0
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits,
                                   atol=1e-5, rtol=0)
    inputs = len(transformer_blocks(model)[0].ffn.inputs)
    bias = 1 if transformer_blocks(model)[0].ffn.output.bias is not None else 0
    per_neuron = inputs * (32 + bias) + 32  # input rows (+bias) and one output column
    assert result.parameters_before - result.parameters_after == 32 * per_neuron
    assert model.config.intermediate_size == 48  # uniform again


def test_global_scope_ranks_normalised_scores_across_layers():
    model, batches = tiny_llama(), lm_batches()
    scores = neuron_importance(model, batches, lm_loss, by="gradient")
    result = prune_neurons(model, batches, lm_loss, fraction=0.5, by="gradient", scope="global")
    assert result.neurons_after == 64 and result.scope == "global"
    normalised = [s / s.norm() for s in scores]
    threshold = max(float(normalised[l][n]) for l, ns in result.removed.items() for n in ns)
    kept_minimum = min(float(normalised[l][n]) for l in range(2) for n in range(64)
                       if n not in result.removed.get(l, []))
    assert threshold <= kept_minimum


def test_every_layer_keeps_a_neuron():
    model = tiny_bert()
    result = prune_neurons(model, cls_batches(), None, fraction=0.99, scope="global")
    assert all(block.ffn.num_neurons >= 1 for block in transformer_blocks(model))
    assert result.neurons_after >= 2


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="loss_fn"):
        prune_neurons(tiny_bert(), cls_batches(), None, 0.5, by="gradient")
    with pytest.raises(ConfigError, match="scope"):
        prune_neurons(tiny_bert(), cls_batches(), None, 0.5, scope="everywhere")
    with pytest.raises(ConfigError, match="fraction"):
        prune_neurons(tiny_bert(), cls_batches(), None, 1.5)
    with pytest.raises(ConfigError, match="batch"):
        prune_neurons(tiny_bert(), [], None, 0.5)
