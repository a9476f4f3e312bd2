"""Forgetting measurements on tiny models: retain sets are encoded once and scored as the model is
at each call (perplexity for a language model; accuracy and loss among the set's own classes for
a classifier whose head holds several tasks), in eval mode and back; the probe samples fixed-length
continuations reproducibly without touching the global RNG, caches them per base model, reads 0
for the unchanged model and the full KL when it keeps the whole vocabulary, and survives a
save/load of its reference. Real C4 and SST-2 files from ../shared/data are scored end to end."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltatune.data.retain import RETENTION_EVAL_LIMIT, RetainSet, encode_retain_examples
from deltatune.errors import ConfigError
from deltatune.eval.evaluate import evaluate_perplexity
from deltatune.eval.forgetting import PROBE_PROMPTS, ForgettingProbe, retention_evaluator
from tests.conftest import tiny_bert, tiny_llama

VOCAB = 256


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The CPU is shared; tiny models gain nothing from more threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _words() -> list[str]:
    words = ["<pad>", "<s>", "</s>", "<unk>"]
    for prompt in PROBE_PROMPTS:
        for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(prompt):
            if word not in words:
                words.append(word)
    return words + [f"w{index}" for index in range(len(words), VOCAB)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the probe prompts' words (so prompts differ in length), padded with
    fillers to VOCAB ids."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(_words())},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def llama(seed: int = 0):
    return tiny_llama(seed=seed, vocab_size=VOCAB)


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def training_flags(model: torch.nn.Module) -> list[bool]:
    """Records model.training at every forward (to see the mode inside a call)."""
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    return seen


# -- retain sets: language models ------------------------------------------------------------

def text_file(tmp_path: Path, documents: int = 120) -> Path:
    words = " ".join(PROBE_PROMPTS).split()
    return write_jsonl(tmp_path / "general-text.jsonl",
                       [{"text": " ".join(words[index % 50:index % 50 + 9])}
                        for index in range(documents)])


def test_language_sets_report_loss_and_perplexity_of_the_model_as_it_is_now(tmp_path,
                                                                             tokenizer):
    model = llama()
    path = text_file(tmp_path)
    evaluate = retention_evaluator(model, tokenizer, [RetainSet(str(path))], "language", 16)
    path.unlink()  # encoded once, at construction
    before = evaluate()
    assert set(before) == {"retain_general_text_loss", "retain_general_text_perplexity"}
    blocks = encode_retain_examples(RetainSet(str(text_file(tmp_path))), tokenizer, "language",
                                    16, default_limit=RETENTION_EVAL_LIMIT)
    assert len(blocks) == RETENTION_EVAL_LIMIT
    direct = evaluate_perplexity(model, blocks, tokenizer.pad_token_id)
    assert before["retain_general_text_loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert before["retain_general_text_perplexity"] == \
        pytest.approx(math.exp(direct["loss"]), rel=1e-6)
    perturb(model, 0.2)
    assert evaluate()["retain_general_text_loss"] != \
        pytest.approx(before["retain_general_text_loss"], rel=1e-3)


def test_the_evaluator_runs_in_eval_mode_and_restores_training_mode(tmp_path, tokenizer):
    model = llama()
    evaluate = retention_evaluator(model, tokenizer, [RetainSet(str(text_file(tmp_path)))],
                                   "language", 16)
    seen = training_flags(model)
    model.train()
    evaluate()
    assert seen and not any(seen)
    assert model.training


def test_two_sets_with_one_name_are_refused(tmp_path, tokenizer):
    first = text_file(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    second = text_file(other)
    sets = [RetainSet(str(first)), RetainSet(str(second))]
    with pytest.raises(ConfigError, match=r"both named 'general_text'.*give each its own name"):
        retention_evaluator(llama(), tokenizer, sets, "language", 16)
    named = [RetainSet(str(first)), RetainSet(str(second), name="other")]
    metrics = retention_evaluator(llama(), tokenizer, named, "language", 16)()
    assert {"retain_general_text_loss", "retain_other_loss"} <= set(metrics)


# -- retain sets: classifiers ----------------------------------------------------------------

def test_classifier_accuracy_and_loss_are_taken_among_the_sets_own_classes(tmp_path,
                                                                           tokenizer):
    """A head that holds an earlier task (A, B) and a later one (0, 1): the later classes'
    logits are made to dominate, so a full argmax would never say A or B."""
    head = ["0", "1", "A", "B"]
    path = tmp_path / "earlier.tsv"
    rows = ["label\ttext"] + [f"{'AB'[index % 2]}\t{PROBE_PROMPTS[index]}" for index in range(12)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    model = tiny_bert(num_labels=4, vocab_size=VOCAB)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)
        model.classifier.bias.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))
    metrics = retention_evaluator(model, tokenizer, [RetainSet(str(path))], "classification",
                                  32, head)()
    examples = encode_retain_examples(RetainSet(str(path)), tokenizer, "classification", 32,
                                      head)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([example["input_ids"]])).logits
                            for example in examples])[:, [2, 3]]
    targets = torch.tensor([example["label"] - 2 for example in examples])
    assert set(metrics) == {"retain_earlier_accuracy", "retain_earlier_loss"}
    assert metrics["retain_earlier_accuracy"] == \
        pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert metrics["retain_earlier_loss"] == \
        pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert metrics["retain_earlier_accuracy"] > 0  # a full argmax would score 0


# -- the probe -------------------------------------------------------------------------------

def probe(model, tokenizer, cache: Path, **settings) -> ForgettingProbe:
    return ForgettingProbe(model, tokenizer, "tiny-llama", cache_dir=cache, **settings)


def test_continuations_are_the_prompts_plus_exactly_new_tokens(tmp_path, tokenizer):
    sampled = probe(llama(), tokenizer, tmp_path, prompts=5, new_tokens=12)
    sequences = sampled.continuations()
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in PROBE_PROMPTS[:5]]
    assert len(sequences) == 5
    assert len({len(prompt) for prompt in prompts}) > 1  # batched across prompt lengths
    for sequence, prompt in zip(sequences, prompts):
        assert sequence[:len(prompt)] == prompt
        assert len(sequence) == len(prompt) + 12
    assert sampled.generated


def test_sampling_never_stops_early_even_where_the_model_would_end_the_text(tmp_path,
                                                                            tokenizer):
    model = llama()
    eos = torch.zeros(VOCAB)
    eos[tokenizer.eos_token_id] = 30.0  # EOS is then nearly certain at every step
    model.lm_head.register_forward_hook(lambda module, args, output: output + eos)
    sampled = probe(model, tokenizer, tmp_path, prompts=4, new_tokens=10)
    for sequence, prompt in zip(sampled.continuations(), sampled.prompt_ids):
        new = sequence[len(prompt):]
        assert len(new) == 10
        assert tokenizer.eos_token_id not in new and tokenizer.pad_token_id not in new


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tmp_path, tokenizer):
    model = llama()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = probe(model, tokenizer, tmp_path / "a", seed=1).continuations()
    assert torch.equal(torch.get_rng_state(), state)
    again = probe(model, tokenizer, tmp_path / "b", seed=1).continuations()
    other = probe(model, tokenizer, tmp_path / "c", seed=2).continuations()
    assert first == again
    assert first != other


def test_continuations_are_cached_per_base_model(tmp_path, tokenizer):
    model = llama()
    first = probe(model, tokenizer, tmp_path)
    sequences = first.continuations()
    assert first.generated and len(list(tmp_path.glob("*.json"))) == 1
    calls = []
    original_generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(1) or original_generate(*args,
                                                                                 **kwargs)
    second = probe(model, tokenizer, tmp_path)
    assert second.continuations() == sequences
    assert not second.generated and calls == []
    changed = probe(llama(seed=1), tokenizer, tmp_path)
    changed.continuations()
    assert changed.generated and len(list(tmp_path.glob("*.json"))) == 2


def test_a_damaged_cache_file_is_sampled_again(tmp_path, tokenizer):
    model = llama()
    sequences = probe(model, tokenizer, tmp_path).continuations()
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text("{\"sequences\": [[1, 2]]}", encoding="utf-8")
    again = probe(model, tokenizer, tmp_path)
    assert again.continuations() == sequences and again.generated


def test_the_unchanged_model_reads_exactly_zero_and_a_changed_one_more(tmp_path, tokenizer):
    model = llama()
    measured = probe(model, tokenizer, tmp_path, top_k=8)
    measured.capture_reference()
    assert measured() == {"probe_kl": 0.0}
    perturb(model)
    assert measured()["probe_kl"] > 1e-6


def test_with_the_whole_vocabulary_the_probe_is_the_full_kl(tmp_path, tokenizer):
    model = llama()
    original = copy.deepcopy(model)
    full = probe(model, tokenizer, tmp_path, top_k=VOCAB, prompts=6, new_tokens=10)
    coarse = probe(model, tokenizer, tmp_path, top_k=4, prompts=6, new_tokens=10)
    full.capture_reference()
    coarse.capture_reference()
    perturb(model)
    kl_sum, positions = 0.0, 0
    with torch.no_grad():
        for sequence, prompt in zip(full.continuations(), full.prompt_ids):
            ids = torch.tensor([sequence])
            # One sequence at a time, unpadded: the reference for the probe's padded batches.
            p = F.log_softmax(original(input_ids=ids).logits[0].double(), -1)
            q = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            rows = slice(len(prompt) - 1, len(sequence) - 1)
            kl_sum += (p[rows].exp() * (p[rows] - q[rows])).sum().item()
            positions += len(sequence) - len(prompt)
    assert positions == 60
    assert full()["probe_kl"] == pytest.approx(kl_sum / positions, rel=1e-5)
    assert 0 < coarse()["probe_kl"] <= full()["probe_kl"]


def test_batching_does_not_change_the_probe(tmp_path, tokenizer):
    model = llama()
    one, eight = (probe(model, tokenizer, tmp_path, batch_size=size) for size in (1, 8))
    one.capture_reference()
    eight.capture_reference()
    perturb(model)
    assert one()["probe_kl"] == pytest.approx(eight()["probe_kl"], rel=1e-4)


def test_the_reference_round_trips_through_safetensors(tmp_path, tokenizer):
    model = llama()
    original = probe(model, tokenizer, tmp_path / "cache")
    original.capture_reference()
    original.save_reference(tmp_path / "probe_reference.safetensors")
    perturb(model)
    resumed = probe(model, tokenizer, tmp_path / "empty-cache")
    resumed.load_reference(tmp_path / "probe_reference.safetensors")
    assert resumed() == original()
    assert resumed.continuations() == original.continuations()
    assert not resumed.generated
    with pytest.raises(ConfigError, match=r"captured with 16 prompts x 48 new tokens and this "
                                          r"probe asks for 4 x 48"):
        probe(model, tokenizer, tmp_path, prompts=4).load_reference(
            tmp_path / "probe_reference.safetensors")
    with pytest.raises(ConfigError, match="no probe reference at"):
        resumed.load_reference(tmp_path / "absent.safetensors")


def test_the_probe_restores_the_mode_and_counts_its_seconds(tmp_path, tokenizer):
    model = llama()
    measured = probe(model, tokenizer, tmp_path)
    seen = training_flags(model)
    model.train()
    measured.capture_reference()
    spent = measured.seconds
    measured()
    assert seen and not any(seen)
    assert model.training
    assert 0 < spent < measured.seconds


def test_the_probe_refuses_what_it_cannot_measure(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="capture_reference"):
        probe(llama(), tokenizer, tmp_path)()
    with pytest.raises(ConfigError, match=f"ask for 1 to {len(PROBE_PROMPTS)}"):
        probe(llama(), tokenizer, tmp_path, prompts=len(PROBE_PROMPTS) + 1)
    with pytest.raises(ConfigError, match="cannot generate"):
        ForgettingProbe(tiny_bert(vocab_size=VOCAB), tokenizer, "bert", cache_dir=tmp_path)


# -- real data -------------------------------------------------------------------------------

def test_real_c4_and_sst2_sets_are_scored(shared_data, tokenizer):
    lm = retention_evaluator(llama(), tokenizer,
                             [RetainSet(str(shared_data / "text" / "c4_demo.jsonl"), limit=4)],
                             "language", 64)()
    # A random model over VOCAB ids is about uniform: perplexity near the vocabulary size.
    assert VOCAB / 2 < lm["retain_c4_demo_perplexity"] < VOCAB * 2
    head = ["0", "1", "ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    classifier = retention_evaluator(
        tiny_bert(num_labels=len(head), vocab_size=VOCAB), tokenizer,
        [RetainSet(str(shared_data / "sst2" / "dev.tsv"), name="sst2",
                   columns={"text": "content"})], "classification", 64, head)()
    assert set(classifier) == {"retain_sst2_accuracy", "retain_sst2_loss"}
    assert 0 <= classifier["retain_sst2_accuracy"] <= 1
    # Two classes, an untrained head: the restricted loss is near log 2, not log 8.
    assert classifier["retain_sst2_loss"] == pytest.approx(math.log(2), abs=0.3)
