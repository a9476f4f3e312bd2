"""Head importance (Michel et al. 2019) and head pruning: the gate gradient equals the loss's
finite-difference sensitivity, rows are L2-normalised, the least important heads go, GQA groups
stay uniform in both modes, the removed model computes what the masked one did, and the real
packaged models prune, save, reload and generate."""
from __future__ import annotations

import copy

import pytest
import torch

from deltatune.compress.heads import HeadGates, head_importance, prune_heads
from deltatune.errors import ConfigError
from deltatune.models.structure import transformer_blocks
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from tests.conftest import random_batch, tiny_bert, tiny_llama

LM_OBJECTIVE = CausalLMObjective()
CLS_OBJECTIVE = ClassificationObjective()


def lm_loss(model, batch):
    return LM_OBJECTIVE(model, batch).loss


def cls_loss(model, batch):
    return CLS_OBJECTIVE(model, batch).loss


def lm_batches(count: int = 3, vocab_size: int = 128, length: int = 10) -> list[dict]:
    batches = []
    for seed in range(count):
        batch = random_batch(length=length, vocab_size=vocab_size, seed=seed)
        batch["labels"] = batch["input_ids"].clone()
        batches.append(batch)
    return batches


def cls_batches(count: int = 2, vocab_size: int = 128) -> list[dict]:
    return [{**random_batch(vocab_size=vocab_size, seed=seed, length=12),
             "labels": torch.tensor([seed % 2, 1 - seed % 2])} for seed in range(count)]


def test_masking_a_head_with_gates_equals_removing_it():
    from deltatune.models.structure import remove_heads
    model, batch = tiny_llama(), random_batch()
    with HeadGates(model) as gates, torch.no_grad():
        gates.mask(0, [0, 2])
        masked = model(**batch).logits
    with torch.no_grad():
        unmasked_after_exit = model(**batch).logits
    remove_heads(model, {0: [0, 2]})
    with torch.no_grad():
        removed = model(**batch).logits
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked_after_exit, masked)  # hooks are gone after the block


def test_importance_is_the_absolute_gate_gradient_normalised_per_layer():
    # BERT, not Llama: Llama's RMSNorm computes in float32 even in a float64 model, which
    # would make the finite differences below noisy
    model, batch = tiny_bert().double(), cls_batches(1)[0]

    def loss(model, batch):  # float64 end to end, so finite differences are precise
        return model(input_ids=batch["input_ids"]).logits.pow(2).mean()

    importance = head_importance(model, [batch], loss)
    assert importance.shape == (2, 4)
    torch.testing.assert_close(importance.norm(dim=1), torch.ones(2))
    raw = torch.zeros(2, 4)
    step = 2.0 ** -12  # exact in the float32 gate
    with HeadGates(model) as gates, torch.no_grad():
        for layer in range(2):
            for head in range(4):
                gates.gates[layer][head] = 1 + step
                up = float(loss(model, batch))
                gates.gates[layer][head] = 1 - step
                down = float(loss(model, batch))
                gates.gates[layer][head] = 1.0
                raw[layer, head] = abs(up - down) / (2 * step)
    expected = raw / raw.norm(dim=1, keepdim=True)
    torch.testing.assert_close(importance, expected, atol=1e-4, rtol=0)


def test_scoring_leaves_parameters_modes_and_gradients_as_they_were():
    model = tiny_bert()
    model.train()
    model.classifier.weight.requires_grad_(False)
    head_importance(model, cls_batches(), cls_loss)
    assert model.training and model.bert.encoder.layer[0].training
    assert not model.classifier.weight.requires_grad
    assert model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())


def test_bert_pruning_removes_the_least_important_heads():
    model, batches = tiny_bert(), cls_batches()
    importance = head_importance(model, batches, cls_loss)
    result = prune_heads(model, batches, cls_loss, fraction=0.5)
    flat = sorted((float(importance[l, h]), l, h) for l in range(2) for h in range(4))
    expected: dict[int, list[int]] = {}
    for _, layer, head in flat[:4]:
        expected.setdefault(layer, []).append(head)
    assert result.removed == {layer: sorted(heads) for layer, heads in expected.items()}
    assert (result.heads_before, result.heads_after) == (8, 4)
    per_head = 3 * (8 * 32 + 8) + 32 * 8  # q/k/v rows with biases, o columns
    assert result.parameters_before - result.parameters_after == 4 * per_head
    torch.testing.assert_close(torch.tensor(result.importance), importance)


def test_query_heads_mode_removes_one_head_per_group_and_matches_the_masked_model():
    model, batches = tiny_llama(), lm_batches()
    reference = copy.deepcopy(model)
    result = prune_heads(model, batches, lm_loss, fraction=0.5, iterations=2)
    assert result.heads_after == 4 and result.removed_kv_groups == {}
    for layer, heads in result.removed.items():
        assert sorted(head // 2 for head in heads) == [0, 1]  # one head from each group
    for block in transformer_blocks(model):
        assert block.attention.num_kv_heads == 2  # KV cache unchanged
    with HeadGates(reference) as gates, torch.no_grad():
        for layer, heads in result.removed.items():
            gates.mask(layer, heads)
        masked = reference(**random_batch()).logits
    with torch.no_grad():
        torch.testing.assert_close(model(**random_batch()).logits, masked, atol=1e-5, rtol=0)
    per_head = 8 * 32 * 2  # q rows + o columns, no biases in Llama
    assert result.parameters_before - result.parameters_after == 4 * per_head


def test_kv_groups_mode_removes_whole_groups_scored_by_their_heads():
    model, batches = tiny_llama(), lm_batches()
    importance = head_importance(model, batches, lm_loss)
    result = prune_heads(model, batches, lm_loss, fraction=0.5, gqa="kv-groups")
    group_scores = sorted((float(importance[l, 2 * g:2 * g + 2].sum()), l, g)
                          for l in range(2) for g in range(2))
    # the two lowest groups, but never both groups of one layer
    expected: dict[int, list[int]] = {}
    for _, layer, group in group_scores:
        if sum(map(len, expected.values())) == 2:
            break
        if len(expected.get(layer, [])) < 1:
            expected.setdefault(layer, []).append(group)
    assert result.removed_kv_groups == expected
    for block in transformer_blocks(model):
        assert block.attention.num_kv_heads == 1 and block.attention.k.out_features == 8
    per_group = 2 * 8 * 32 * 2 + 2 * 8 * 32  # two q heads + o columns, one k and one v head
    assert result.parameters_before - result.parameters_after == 2 * per_group


def test_every_layer_keeps_a_head_and_iterations_reach_the_target():
    model = tiny_bert()
    result = prune_heads(model, cls_batches(), cls_loss, fraction=0.75, iterations=3,
                         progress=True)
    assert result.heads_after == 2
    assert [b.attention.num_heads for b in transformer_blocks(model)] == [1, 1]


@pytest.mark.parametrize("kwargs", [{"fraction": 1.0}, {"fraction": 0.5, "iterations": 0},
                                    {"fraction": 0.5, "gqa": "groups"}])
def test_bad_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        prune_heads(tiny_bert(), cls_batches(), cls_loss, **kwargs)


def test_a_loss_without_graph_is_refused():
    with pytest.raises(ConfigError, match="loss_fn"):
        head_importance(tiny_bert(), cls_batches(), lambda model, batch: torch.tensor(1.0))


# -- real packaged models ------------------------------------------------------------------------

def test_minilm_heads_prune_by_half_with_the_expected_parameter_count():
    from deltatune.models import load_model
    loaded = load_model("minilm-l6", task="classification", num_labels=2)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = ["the film was wonderful", "a dull and tiresome plot", "great acting", "boring"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    batches = [{**encoded, "labels": torch.tensor([1, 0, 1, 0])}]
    importance = head_importance(model, batches, cls_loss)
    assert importance.shape == (6, 12) and torch.isfinite(importance).all()
    result = prune_heads(model, batches, cls_loss, fraction=0.5)
    assert result.heads_after == 36
    per_head = 3 * (32 * 384 + 32) + 32 * 384
    assert result.parameters_before - result.parameters_after == 36 * per_head
    with torch.no_grad():
        out = model(**encoded).logits
    assert out.shape == (4, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("gqa", ["query-heads", "kv-groups"])
def test_smollm2_prunes_saves_reloads_and_generates(tmp_path, gqa):
    from deltatune.models import load_model
    from deltatune.models.pruned import save_pruned
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = tokenizer(["The capital of France is Paris.", "One, two, three, four."],
                        padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    batches = [{**encoded, "labels": labels}]
    result = prune_heads(model, batches, lm_loss, fraction=0.34, gqa=gqa)
    assert result.heads_before == 270 and result.heads_after < 270
    if gqa == "kv-groups":
        assert result.heads_before - result.heads_after == 3 * sum(
            map(len, result.removed_kv_groups.values()))
    else:
        assert all(len(heads) % 3 == 0 for heads in result.removed.values())
    folder = tmp_path / "smol"
    save_pruned(model, tokenizer, folder)
    reloaded = load_model(str(folder)).model
    prompt = tokenizer(["Hello"], return_tensors="pt")
    with torch.no_grad():
        generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
        expected = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    assert torch.equal(generated, expected)
