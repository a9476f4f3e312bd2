"""Unstructured and N:M pruning on tiny Llama and BERT models: which weights are selected, exact
sparsities, the magnitude and Wanda orderings against direct computations, padding left out of
Wanda's activation norms, masks applied as exact zeros, the report's counts, and the errors."""
from __future__ import annotations

import pytest
import torch

from deltatune.compress.unstructured import (apply_masks, input_feature_norms, magnitude_masks,
                                             masks_from_weights, prunable_linears,
                                             sparsity_report, wanda_masks)
from deltatune.errors import ConfigError
from deltatune.quant import quantize_model
from tests.conftest import random_batch, tiny_bert, tiny_llama


def test_selection_is_the_block_linears_only():
    llama = [name for name, _ in prunable_linears(tiny_llama())]
    bert = [name for name, _ in prunable_linears(tiny_bert())]
    assert len(llama) == 2 * 7 and all(name.startswith("model.layers.") for name in llama)
    assert len(bert) == 2 * 6 and all(name.startswith("bert.encoder.layer.") for name in bert)
    assert not any(word in name for name in llama + bert
                   for word in ("embed", "lm_head", "classifier", "pooler"))


def _pruned_fraction(mask: torch.Tensor) -> float:
    return float((~mask).sum()) / mask.numel()


def test_local_magnitude_prunes_each_layer_to_the_sparsity_by_size():
    model = tiny_llama()
    masks = magnitude_masks(model, 0.5)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach().abs()
        assert _pruned_fraction(mask) == 0.5, name
        assert weight[mask].min() >= weight[~mask].max(), name


def test_global_magnitude_uses_one_threshold_and_layers_differ():
    model = tiny_llama()
    # Make one layer's weights much larger: a global threshold prunes it less than the others.
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(10)
    masks = magnitude_masks(model, 0.6, scope="global")
    kept = torch.cat([model.get_submodule(n).weight.detach().abs()[m] for n, m in masks.items()])
    pruned = torch.cat([model.get_submodule(n).weight.detach().abs()[~m]
                        for n, m in masks.items()])
    total = sum(m.numel() for m in masks.values())
    assert pruned.numel() == round(0.6 * total)
    assert kept.min() >= pruned.max()
    assert _pruned_fraction(masks["model.layers.0.mlp.up_proj"]) < 0.15
    assert _pruned_fraction(masks["model.layers.1.mlp.up_proj"]) > 0.6


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    model = tiny_bert()
    masks = magnitude_masks(model, pattern="2:4")
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach().abs()
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2), name
        values = weight.reshape(weight.shape[0], -1, 4)
        smallest_kept = values.masked_fill(~groups, float("inf")).min(-1).values
        largest_pruned = values.masked_fill(groups, float("-inf")).max(-1).values
        assert torch.all(smallest_kept >= largest_pruned), name
    assert sparsity_report(model, masks)["sparsity"] == 0.5


def test_pattern_and_sparsity_errors_say_what_to_do():
    model = tiny_llama()
    assert magnitude_masks(model, 0.5, pattern="2:4").keys() == magnitude_masks(model, 0.5).keys()
    with pytest.raises(ConfigError, match="fixes the sparsity at 0.5"):
        magnitude_masks(model, 0.3, pattern="2:4")
    with pytest.raises(ConfigError, match="N:M"):
        magnitude_masks(model, pattern="two of four")
    with pytest.raises(ConfigError, match="0 < N < M"):
        magnitude_masks(model, pattern="4:2")
    with pytest.raises(ConfigError, match="not a multiple"):
        magnitude_masks(model, pattern="2:5")
    with pytest.raises(ConfigError, match="never globally"):
        magnitude_masks(model, pattern="2:4", scope="global")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        magnitude_masks(model, 1.0)
    with pytest.raises(ConfigError, match="give a sparsity"):
        magnitude_masks(model)


def test_quantized_weights_are_refused():
    model = tiny_llama()
    quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="prune before quantizing"):
        magnitude_masks(model, 0.5)


def _padded_batch():
    batch = random_batch(batch=3, length=8)
    batch["attention_mask"][1, 5:] = 0
    batch["attention_mask"][2, 3:] = 0
    return batch


def test_wanda_norms_count_real_tokens_only():
    model = tiny_llama()
    batch = _padded_batch()
    norms = input_feature_norms(model, [batch])
    # The first q_proj sees input_layernorm(embeddings): compute its norm over real tokens.
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(batch["input_ids"]))
    real = hidden[batch["attention_mask"].bool()]
    expected = real.double().pow(2).sum(0).sqrt().float()
    torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj"], expected)
    # Different padding tokens change nothing (right padding, causal model): pads are not counted.
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][batch["attention_mask"] == 0] = 3
    again = input_feature_norms(model, [changed])
    for name, norm in norms.items():
        torch.testing.assert_close(again[name], norm, rtol=1e-5, atol=1e-6)
    everything = input_feature_norms(model, [{"input_ids": batch["input_ids"]}])
    assert not torch.allclose(everything["model.layers.0.self_attn.q_proj"], expected)


def test_wanda_keeps_the_top_scores_of_each_row():
    model = tiny_llama()
    batches = [_padded_batch(), random_batch(seed=5)]
    norms = input_feature_norms(model, batches)
    masks = wanda_masks(model, batches, 0.5)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        score = weight.abs() * norms[name]
        assert torch.all((~mask).sum(1) == weight.shape[1] // 2), name
        lowest_kept = score.masked_fill(~mask, float("inf")).min(1).values
        highest_pruned = score.masked_fill(mask, float("-inf")).max(1).values
        assert torch.all(lowest_kept >= highest_pruned), name
    # The activations matter: Wanda disagrees with plain magnitude on some weights.
    magnitude = magnitude_masks(model, 0.5)
    assert any(not torch.equal(masks[n], magnitude[n]) for n in masks)


def test_wanda_two_four_and_training_mode_is_restored():
    model = tiny_bert()
    model.train()
    masks = wanda_masks(model, [random_batch()], pattern="2:4")
    assert model.training
    for mask in masks.values():
        assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2)
    with pytest.raises(ConfigError, match="got none"):
        wanda_masks(model, iter([]), 0.5)


def test_apply_masks_zeroes_exactly_and_keeps_the_rest():
    model = tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model)}
    embeddings = model.model.embed_tokens.weight.detach().clone()
    masks = magnitude_masks(model, 0.7)
    apply_masks(model, masks)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.all(weight[~mask] == 0) and not torch.signbit(weight[~mask]).any()
        assert torch.equal(weight[mask], before[name][mask])
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    recovered = masks_from_weights(model)
    assert all(torch.equal(recovered[n], masks[n]) for n in masks)


def test_apply_masks_refuses_masks_of_another_model():
    masks = magnitude_masks(tiny_llama(), 0.5)
    with pytest.raises(ConfigError, match="names no module"):
        apply_masks(tiny_bert(), masks)
    wrong = {"model.layers.0.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="has shape"):
        apply_masks(tiny_llama(), wrong)


def test_report_counts_selected_and_all_parameters():
    model = tiny_llama()
    masks = magnitude_masks(model, 0.5)
    planned = sparsity_report(model, masks)
    apply_masks(model, masks)
    measured = sparsity_report(model)
    selected = sum(m.weight.numel() for _, m in prunable_linears(model))
    parameters = sum(p.numel() for p in model.parameters())
    for report in (planned, measured):
        assert report["selected_weights"] == selected
        assert report["selected_zeros"] == selected // 2
        assert report["sparsity"] == 0.5
        assert report["parameters"] == parameters
        assert set(report["layers"].values()) == {0.5}
    assert measured["parameter_zeros"] == planned["parameter_zeros"]
    assert measured["overall_sparsity"] == pytest.approx(
        measured["parameter_zeros"] / parameters)
    assert 0.3 < measured["overall_sparsity"] < 0.5  # embeddings and norms are not pruned
