"""Structured surgery is exact and the pruned folder round-trips: removing heads, KV groups,
FFN neurons or layers leaves the rest computing what it did (checked against zeroing the same
parts), configs follow uniform shapes, and a saved pruned model loads back with identical
logits — through load_model, or through plain transformers when the config suffices."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          PreTrainedTokenizerFast)

from deltatune.errors import ConfigError
from deltatune.models import load_model
from deltatune.models.pruned import MARKER, describes, save_pruned
from deltatune.models.structure import (apply_architecture_shapes, architecture_shapes,
                                        remove_heads, remove_kv_groups, remove_layers,
                                        remove_neurons, transformer_blocks)
from tests.conftest import random_batch, tiny_bert, tiny_llama


def word_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t1", eos_token="t2",
                                   unk_token="t0")


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def zero_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """The reference for removal: a head whose o_proj columns are zero contributes nothing."""
    blocks = transformer_blocks(model)
    with torch.no_grad():
        for layer, layer_heads in heads.items():
            attention = blocks[layer].attention
            for head in layer_heads:
                attention.o.weight[:, head * attention.head_dim:(head + 1) * attention.head_dim] = 0


def zero_neurons(model: nn.Module, neurons: dict[int, list[int]]) -> None:
    blocks = transformer_blocks(model)
    with torch.no_grad():
        for layer, layer_neurons in neurons.items():
            blocks[layer].ffn.output.weight[:, layer_neurons] = 0


def test_layouts_are_found_by_structure_in_llama_and_bert():
    llama = transformer_blocks(tiny_llama())
    assert len(llama) == 2
    attention, ffn = llama[0].attention, llama[0].ffn
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (4, 2, 8)
    assert attention.q is llama[0].block.self_attn.q_proj
    assert attention.o is llama[0].block.self_attn.o_proj
    assert ffn.inputs == [llama[0].block.mlp.gate_proj, llama[0].block.mlp.up_proj]
    assert ffn.output is llama[0].block.mlp.down_proj and ffn.num_neurons == 64
    bert = transformer_blocks(tiny_bert())
    attention, ffn = bert[1].attention, bert[1].ffn
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (4, 4, 8)
    assert attention.o is bert[1].block.attention.output.dense
    assert ffn.inputs == [bert[1].block.intermediate.dense]
    assert ffn.output is bert[1].block.output.dense


def test_unrecognised_model_is_refused_naming_its_class():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))] * 2)

    with pytest.raises(ConfigError, match="NoBlocks"):
        transformer_blocks(NoBlocks())


@pytest.mark.parametrize("build,heads", [(tiny_llama, {0: [1, 3], 1: [0, 1]}),
                                         (tiny_bert, {0: [2], 1: [0, 1, 3]})])
def test_removing_heads_equals_zeroing_them(build, heads):
    batch = random_batch()
    pruned, reference = build(), build()
    zero_heads(reference, heads)
    remove_heads(pruned, heads)
    torch.testing.assert_close(logits(pruned, batch), logits(reference, batch), atol=1e-5, rtol=0)
    shapes = architecture_shapes(pruned)["layers"]
    assert [layer["num_heads"] for layer in shapes] == [4 - len(heads[0]), 4 - len(heads[1])]


def test_gqa_group_emptied_by_head_removal_loses_its_kv_head():
    model = tiny_llama()
    remove_heads(model, {1: [0, 1]})  # both query heads of KV group 0
    attention = transformer_blocks(model)[1].attention
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
    assert attention.k.out_features == attention.v.out_features == 8
    assert model.model.layers[1].self_attn.num_key_value_groups == 2


def test_remove_kv_groups_equals_zeroing_their_query_heads():
    batch = random_batch()
    pruned, reference = tiny_llama(), tiny_llama()
    zero_heads(reference, {0: [2, 3]})
    remove_kv_groups(pruned, {0: [1]})
    torch.testing.assert_close(logits(pruned, batch), logits(reference, batch), atol=1e-5, rtol=0)
    attention = transformer_blocks(pruned)[0].attention
    assert (attention.num_heads, attention.num_kv_heads, attention.k.out_features) == (2, 1, 8)


def test_uneven_groups_and_empty_layers_are_refused_without_change():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="per KV group"):
        remove_heads(model, {0: [0, 1], 1: [0]})  # layer 1: groups would keep 1 and 2
    with pytest.raises(ConfigError, match="remove_layers"):
        remove_heads(model, {0: [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="out of range"):
        remove_heads(model, {0: [9]})
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_removing_neurons_equals_zeroing_them(build):
    batch = random_batch()
    neurons = {0: [0, 5, 63], 1: list(range(10, 40))}
    pruned, reference = build(), build()
    zero_neurons(reference, neurons)
    remove_neurons(pruned, neurons)
    torch.testing.assert_close(logits(pruned, batch), logits(reference, batch), atol=1e-5, rtol=0)
    assert [b.ffn.num_neurons for b in transformer_blocks(pruned)] == [61, 34]
    assert pruned.config.intermediate_size == 64  # not uniform: the config keeps its value


def test_removing_layers_renumbers_the_kv_cache_and_config():
    model = tiny_llama()
    model.config.num_hidden_layers = 2
    remove_layers(model, [0])
    assert model.config.num_hidden_layers == 1
    assert model.model.layers[0].self_attn.layer_idx == 0
    prompt = random_batch(batch=1, length=6)["input_ids"]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == 11


def test_removed_layer_output_equals_skipping_the_block():
    batch = random_batch()
    pruned, reference = tiny_llama(), tiny_llama()
    remove_layers(pruned, [1])
    reference.model.layers[1].forward = lambda hidden_states, *args, **kwargs: hidden_states
    torch.testing.assert_close(logits(pruned, batch), logits(reference, batch))


def test_uniform_llama_shapes_are_written_into_the_config():
    model = tiny_llama()
    remove_heads(model, {0: [1, 3], 1: [0, 2]})
    remove_neurons(model, {0: list(range(16)), 1: list(range(16, 32))})
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size) == (2, 2, 8, 48)
    fresh = type(model)(copy.deepcopy(config))
    assert architecture_shapes(fresh) == architecture_shapes(model)


def test_bert_head_count_stays_in_the_config_because_it_sets_the_head_size():
    model = tiny_bert()
    remove_heads(model, {0: [0], 1: [0]})
    assert model.config.num_attention_heads == 4
    assert model.bert.encoder.layer[0].attention.self.all_head_size == 24


def test_apply_architecture_shapes_resizes_a_fresh_model():
    pruned = tiny_llama()
    remove_kv_groups(pruned, {1: [0]})
    remove_neurons(pruned, {0: [1, 2, 3]})
    remove_layers(pruned, [])
    fresh = tiny_llama(seed=5)
    apply_architecture_shapes(fresh, architecture_shapes(pruned))
    assert architecture_shapes(fresh) == architecture_shapes(pruned)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}


# -- the pruned folder -------------------------------------------------------------------------

def test_non_uniform_llama_round_trips_through_load_model_and_generates(tmp_path):
    model = tiny_llama()
    remove_heads(model, {0: [0, 2]})
    remove_neurons(model, {1: [4, 5, 6]})
    remove_layers(model, [])
    folder = tmp_path / "pruned"
    save_pruned(model, word_tokenizer(), folder,
                extra_json={"report.json": {"note": 1}, "source": "tiny"})
    marker = json.loads((folder / MARKER).read_text())
    assert describes(folder) and marker["config_suffices"] is False
    assert marker["shapes"] == architecture_shapes(model)
    assert marker["steps"][0] == {"removed": "heads", "indices": {"0": [0, 2]}}
    assert json.loads((folder / "report.json").read_text()) == {"note": 1}
    assert marker["extra"] == {"source": "tiny"} and not (folder / "source").exists()
    loaded = load_model(str(folder)).model
    batch = random_batch()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    prompt = batch["input_ids"][:1]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False),
                       model.generate(prompt, max_new_tokens=5, do_sample=False))


def test_llama_without_layers_and_heads_generates_after_reload(tmp_path):
    model = tiny_llama()
    model.config.num_hidden_layers = 2
    remove_layers(model, [0])
    remove_kv_groups(model, {0: [0]})
    save_pruned(model, word_tokenizer(), tmp_path / "p")
    loaded = load_model(str(tmp_path / "p")).model
    assert loaded.config.num_hidden_layers == 1 and len(loaded.model.layers) == 1
    prompt = random_batch(batch=1)["input_ids"]
    out = loaded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=5, do_sample=False))
    assert out.shape[1] == prompt.shape[1] + 5


def test_uniform_llama_folder_loads_in_plain_transformers(tmp_path):
    model = tiny_llama()
    remove_heads(model, {0: [1, 3], 1: [1, 3]})
    remove_neurons(model, {0: [0, 1], 1: [7, 8]})
    remove_layers(model, [1])
    save_pruned(model, word_tokenizer(), tmp_path / "u")
    assert not describes(tmp_path / "u")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    batch = random_batch()
    assert torch.equal(logits(plain, batch), logits(model, batch))
    assert torch.equal(logits(load_model(str(tmp_path / "u")).model, batch), logits(model, batch))


def test_bert_heads_need_the_pruning_file_and_load_back_exactly(tmp_path):
    model = tiny_bert()
    remove_heads(model, {0: [3], 1: [0, 2]})
    save_pruned(model, word_tokenizer(), tmp_path / "b")
    assert describes(tmp_path / "b")
    loaded = load_model(str(tmp_path / "b"), task="classification").model
    batch = random_batch()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    with pytest.raises(Exception):  # transformers alone builds 4 heads and refuses the weights
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "b")


def test_a_damaged_weights_file_is_refused(tmp_path):
    model = tiny_bert()
    remove_heads(model, {0: [1]})
    folder = tmp_path / "d"
    save_pruned(model, word_tokenizer(), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("bert.encoder.layer.0.attention.self.query.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        load_model(str(folder), task="classification")


def test_a_new_task_head_may_replace_the_saved_one(tmp_path):
    model = tiny_bert(num_labels=2)
    remove_heads(model, {0: [1]})
    save_pruned(model, word_tokenizer(), tmp_path / "h")
    loaded = load_model(str(tmp_path / "h"), task="classification", num_labels=3).model
    assert loaded.classifier.out_features == 3
    assert torch.equal(loaded.bert.encoder.layer[0].attention.self.query.weight,
                       model.bert.encoder.layer[0].attention.self.query.weight)
