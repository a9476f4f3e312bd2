"""Sequence-level knowledge distillation (Kim & Rush 2016) as a data transform: the teacher's
beam-search outputs replace the references the student trains on.

`teacher_generations` runs the teacher's beam search over tokenized prompts (left-padded batches,
`num_beams` beams, the `num_return` best candidates per prompt, best first) and caches them in a
JSON-lines file keyed by a hash of the prompt, the settings and the teacher, so a rerun only
generates the prompts it has not seen. `sequence_kd_records` then builds new instruction records:
`seq-kd` trains on the teacher's best beam, `seq-inter` (sequence-level interpolation) on the
candidate closest to the reference by sentence BLEU or token F1 (`closest_candidate`). The
records go through the normal data pipeline and training loop, so the student is trained exactly
as on any instruction data; `prompt_ids_for` gives the prompts the student's template renders.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from deltatune.compress.distill import model_fingerprint
from deltatune.data.templates import encode_instruction
from deltatune.errors import ConfigError, DataError
from deltatune.eval.evaluate import stop_token_ids
from deltatune.fileio import append_jsonl

GENERATIONS_FILE = "teacher_generations.jsonl"
MODES = ("seq-kd", "seq-inter")
METRICS = ("bleu", "token_f1")
# Chen & Cherry (2014) smoothing method 1: a zero n-gram match count becomes this.
BLEU_EPSILON = 0.1
BLEU_MAX_ORDER = 4


# -- prompts ---------------------------------------------------------------------------------

def prompt_ids_for(records: list[dict], tokenizer: Any, template: str) -> list[list[int]]:
    """The generation prompt of each instruction record, token for token what the student's
    training encodes before the response (deltatune.data.templates)."""
    prompts = []
    for record in records:
        if record.get("messages") is None and record.get("output") is None:
            record = {**record, "output": ""}
        prompts.append(encode_instruction(record, tokenizer, template,
                                          max_length=sys.maxsize)["prompt_ids"])
    return prompts


# -- generation ------------------------------------------------------------------------------

def teacher_generations(teacher: nn.Module, tokenizer: Any, prompts: list[list[int]],
                        num_beams: int = 4, num_return: int | None = None,
                        max_new_tokens: int = 64, batch_size: int = 8,
                        cache_folder: str | Path | None = None,
                        progress: bool = False) -> list[list[str]]:
    """The teacher's `num_return` (default `num_beams`) beam candidates per prompt, decoded with
    special tokens stripped, best first. With `cache_folder`, candidates are read from and
    appended to its teacher_generations.jsonl, and only prompts missing there are generated."""
    num_return = num_beams if num_return is None else num_return
    _check_generation_settings(tokenizer, num_beams, num_return, max_new_tokens, batch_size)
    settings = {"num_beams": num_beams, "num_return": num_return,
                "max_new_tokens": max_new_tokens, "stop": stop_token_ids(tokenizer),
                "teacher": model_fingerprint(teacher)}
    keys = [_prompt_key(prompt, settings) for prompt in prompts]
    cache_path = Path(cache_folder) / GENERATIONS_FILE if cache_folder is not None else None
    known = _read_generations(cache_path) if cache_path is not None else {}
    missing = sorted({key: index for index, key in enumerate(keys) if key not in known}.values(),
                     key=lambda index: -len(prompts[index]))
    if missing and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(missing), desc="teacher beams", unit="prompt", disable=not progress)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        candidates = _beam_search(teacher, tokenizer, [prompts[i] for i in chunk], num_beams,
                                  num_return, max_new_tokens)
        for index, texts in zip(chunk, candidates):
            known[keys[index]] = texts
            if cache_path is not None:
                append_jsonl(cache_path, {"key": keys[index], "candidates": texts,
                                          "prompt_tokens": len(prompts[index]), **settings})
        bar.update(len(chunk))
    bar.close()
    return [list(known[key]) for key in keys]


def _check_generation_settings(tokenizer: Any, num_beams: int, num_return: int,
                               max_new_tokens: int, batch_size: int) -> None:
    if num_beams < 1:
        raise ConfigError(f"num_beams must be at least 1, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ConfigError(f"num_return must be between 1 and num_beams ({num_beams}), got "
                          f"{num_return}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("max_new_tokens and batch_size must be at least 1, got "
                          f"{max_new_tokens} and {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token, which batched generation needs; "
                          "load the teacher with deltatune.models.load_model or set one")


def _prompt_key(prompt: list[int], settings: dict) -> str:
    text = json.dumps({"prompt": list(map(int, prompt)), **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_generations(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    known = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                known[entry["key"]] = list(entry["candidates"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f"{path} line {number} is not a generation record ({error}); "
                                "delete the file to generate again") from error
    return known


@torch.inference_mode()
def _beam_search(teacher: nn.Module, tokenizer: Any, prompts: list[list[int]], num_beams: int,
                 num_return: int, max_new_tokens: int) -> list[list[str]]:
    was_training = teacher.training
    teacher.eval()
    try:
        device = next(teacher.parameters()).device
        batch = {name: value.to(device) for name, value in
                 left_padded([prompt or _start_ids(tokenizer) for prompt in prompts],
                             tokenizer.pad_token_id).items()}
        generated = teacher.generate(**batch, num_beams=num_beams,
                                     num_return_sequences=num_return, do_sample=False,
                                     early_stopping=True, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=stop_token_ids(tokenizer))
    finally:
        teacher.train(was_training)
    texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:],
                                   skip_special_tokens=True)
    texts = [text.strip() for text in texts]
    return [texts[row * num_return:(row + 1) * num_return] for row in range(len(prompts))]


def left_padded(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left, so every row's next token follows its last real one."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _start_ids(tokenizer: Any) -> list[int]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    if start is None:
        raise DataError("a prompt is empty and the tokenizer has neither a BOS nor an EOS token "
                        "to start from; give every record a non-empty instruction")
    return [start]


# -- similarity to the reference -------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    return text.lower().split()


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD-style F1 of the bags of lowercased whitespace tokens (1.0 when both are empty)."""
    candidate_tokens, reference_tokens = _tokens(candidate), _tokens(reference)
    if not candidate_tokens or not reference_tokens:
        return float(candidate_tokens == reference_tokens)
    common = sum((Counter(candidate_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def sentence_bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 on lowercased whitespace tokens: clipped n-gram precisions for n = 1..4,
    geometric mean, brevity penalty; a zero count for n >= 2 becomes 0.1 / (n-grams in the
    candidate) (Chen & Cherry 2014, method 1). No unigram in common gives 0."""
    candidate_tokens, reference_tokens = _tokens(candidate), _tokens(reference)
    if not candidate_tokens:
        return 0.0
    log_precision_sum = 0.0
    for order in range(1, BLEU_MAX_ORDER + 1):
        candidate_ngrams = _ngrams(candidate_tokens, order)
        matches = sum((candidate_ngrams & _ngrams(reference_tokens, order)).values())
        total = max(sum(candidate_ngrams.values()), 1)
        if matches == 0 and order == 1:
            return 0.0
        log_precision_sum += math.log((matches or BLEU_EPSILON) / total)
    brevity = 1.0 if len(candidate_tokens) > len(reference_tokens) else \
        math.exp(1 - len(reference_tokens) / len(candidate_tokens))
    return brevity * math.exp(log_precision_sum / BLEU_MAX_ORDER)


SIMILARITY = {"bleu": sentence_bleu, "token_f1": token_f1}


def closest_candidate(candidates: list[str], reference: str,
                      metric: Literal["bleu", "token_f1"] = "bleu") -> int:
    """Index of the candidate most similar to `reference`; ties go to the earlier (better
    ranked) beam."""
    if metric not in SIMILARITY:
        raise ConfigError(f"unknown similarity metric {metric!r}; choose one of "
                          f"{', '.join(METRICS)}")
    if not candidates:
        raise ConfigError("no candidates to choose from; generate at least one beam per prompt")
    scores = [SIMILARITY[metric](candidate, reference) for candidate in candidates]
    return max(range(len(scores)), key=lambda index: (scores[index], -index))


# -- new training records --------------------------------------------------------------------

def sequence_kd_records(records: list[dict], generations: list[list[str]],
                        mode: Literal["seq-kd", "seq-inter"] = "seq-kd",
                        output_key: str = "output",
                        metric: Literal["bleu", "token_f1"] = "bleu") -> list[dict]:
    """Copies of `records` whose response (`output_key`, or a chat's last assistant message) is
    the teacher's best beam (`seq-kd`) or the candidate closest to the record's own response
    (`seq-inter`)."""
    if mode not in MODES:
        raise ConfigError(f"unknown sequence-KD mode {mode!r}; choose one of {', '.join(MODES)}")
    if len(records) != len(generations):
        raise ConfigError(f"{len(records)} records but {len(generations)} lists of generations; "
                          "generate from prompt_ids_for(records, ...) of the same records")
    updated = []
    for number, (record, candidates) in enumerate(zip(records, generations), start=1):
        if not candidates:
            raise ConfigError(f"record {number} has no teacher candidates; generate again")
        choice = 0 if mode == "seq-kd" else \
            closest_candidate(candidates, _response(record, output_key, number), metric)
        updated.append(_with_response(record, output_key, candidates[choice]))
    return updated


def _response(record: dict, output_key: str, number: int) -> str:
    if output_key in record:
        return str(record[output_key])
    assistant = _last_assistant_index(record)
    if assistant is None:
        raise DataError(f"record {number} has no {output_key!r} field and no assistant message "
                        "to compare the candidates with; pass output_key=<response column>")
    message = record["messages"][assistant]
    return str(message[_content_key(message)])


def _with_response(record: dict, output_key: str, text: str) -> dict:
    assistant = _last_assistant_index(record)
    if output_key in record or assistant is None:
        return {**record, output_key: text}
    messages = [dict(message) for message in record["messages"]]
    messages[assistant][_content_key(messages[assistant])] = text
    return {**record, "messages": messages}


def _content_key(message: dict) -> str:
    """OpenAI-style messages hold `content`; ShareGPT's {from, value} hold `value`."""
    return "content" if "role" in message else "value"


def _last_assistant_index(record: dict) -> int | None:
    messages = record.get("messages")
    if not isinstance(messages, list):
        return None
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and \
                (message.get("role") or message.get("from")) in ("assistant", "gpt"):
            return index
    return None
