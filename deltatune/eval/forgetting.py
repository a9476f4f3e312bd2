"""Measuring forgetting: how much of what a model could do before fine-tuning it still does.

`retention_evaluator` scores retain sets (deltatune.data.retain) at every call: a language model's
loss and perplexity on each set's blocks or responses, a classifier's accuracy and loss on each
earlier task, judged among that task's own classes only (task-incremental evaluation: a head
trained on SST-2 and then TREC holds both label sets, and SST-2 is scored by the argmax over its
two classes).

`ForgettingProbe` needs no data. It samples continuations of a fixed list of neutral English
prompts from the base model itself (temperature 1, a fixed seed, the global RNG untouched), keeps
the base model's next-token distributions over the continuation tokens (top-k log-probabilities
plus the remaining mass, as deltatune.compress.distill's teacher cache does), and reports
`probe_kl`, the mean over those positions of KL(base || current model): exactly what the model no
longer predicts the way it did, on text it found likely itself. The continuations are cached on
disk per base model (`$DELTATUNE_CACHE/probes`, JSON), so only the first run on a model pays for
generation; the reference is saved with the run so a resumed run reloads it.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from deltatune.compress.distill import (cached_kl_divergence_sum, model_fingerprint,
                                        select_positions, teacher_logits_for)
from deltatune.compress.sequence_kd import left_padded
from deltatune.data.collate import IGNORE_INDEX, pad_batch
from deltatune.data.retain import (RETENTION_EVAL_LIMIT, EncodedRetainSet, RetainSet,
                                   encode_retain_set)
from deltatune.errors import ConfigError
from deltatune.eval.evaluate import evaluate_perplexity
from deltatune.eval.metrics import accuracy
from deltatune.fileio import write_json, write_safetensors
from deltatune.models.registry import cache_root

PROBE_PROMPTS: tuple[str, ...] = (
    "The history of the city",
    "Once upon a time,",
    "Here are a few tips for",
    "Scientists have recently",
    "The best way to learn a new language is",
    "In the early morning, the village",
    "My favourite recipe for dinner",
    "The main reasons people travel are",
    "According to the report, the company",
    "When I was a child, I",
    "The weather this weekend will be",
    "A good friend is someone who",
    "The museum's new exhibition",
    "To fix a flat bicycle tyre,",
    "The river flows through",
    "In his speech, the president said",
    "The most important thing about music is",
    "Last summer we visited",
    "The book tells the story of",
    "Doctors recommend that you",
    "The team won the match because",
    "There are many kinds of trees, such as",
    "The old house at the end of the street",
    "Learning to program a computer",
    "The price of bread has",
    "On the first day of school,",
    "The ocean covers most of",
    "She opened the letter and",
    "The new law requires",
    "Farmers in the region grow",
    "The train to the capital",
    "If you want to stay healthy,",
)

PROBE_FORMAT = 1
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "repetition_penalty": 1.0, "num_beams": 1}


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked and unlabelled, so any id serves when there is no pad token.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- retain sets -----------------------------------------------------------------------------

def retention_evaluator(model: nn.Module, tokenizer: Any, sets: list[RetainSet], kind: str,
                        max_length: int, label_names: list[str] | None = None,
                        batch_size: int = 32,
                        progress: bool = False) -> Callable[[], dict[str, float]]:
    """Encodes every set once (at most RETENTION_EVAL_LIMIT examples unless a set says) and
    returns a function that scores the model as it is then: `retain_<name>_loss` and
    `retain_<name>_perplexity` for a language model, `retain_<name>_accuracy` and
    `retain_<name>_loss` among the set's own classes for a classifier (`label_names`: the
    head's classes in head order)."""
    _check_distinct_names(sets)
    encoded = [encode_retain_set(source, tokenizer, kind, max_length, label_names,
                                 RETENTION_EVAL_LIMIT) for source in sets]
    pad_token_id = _pad_id(tokenizer)

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        with evaluation_mode(model):
            for retained in encoded:
                if retained.label_ids is None:
                    scores = evaluate_perplexity(model, retained.examples, pad_token_id,
                                                 batch_size, progress)
                else:
                    scores = restricted_classification(model, retained, pad_token_id,
                                                       batch_size, progress)
                metrics.update({f"retain_{retained.name}_{metric}": value
                                for metric, value in scores.items()})
        return metrics

    return evaluate


def _check_distinct_names(sets: list[RetainSet]) -> None:
    paths: dict[str, str] = {}
    for source in sets:
        name = source.display_name
        if name in paths:
            raise ConfigError(f"two retain sets are both named {name!r} ({paths[name]} and "
                              f"{source.path}), so their metrics would collide; give each its "
                              "own name (name: ... in eval.retain, or --retain-eval NAME=PATH)")
        paths[name] = source.path


@torch.inference_mode()
def restricted_classification(model: nn.Module, retained: EncodedRetainSet, pad_token_id: int,
                              batch_size: int = 32,
                              progress: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the logits of the set's own classes only."""
    device = _device(model)
    columns = torch.tensor(retained.label_ids, device=device)
    predictions: list[int] = []
    targets: list[int] = []
    loss_sum = 0.0
    with evaluation_mode(model):
        for chunk in tqdm(list(_chunks(retained.examples, batch_size)),
                          desc=f"retain {retained.name}", disable=not progress):
            batch = {k: v.to(device) for k, v in pad_batch(list(chunk), pad_token_id).items()}
            head_targets = batch.pop("labels")
            logits = model(**batch).logits
            _check_head_size(logits, retained)
            own_logits = logits[:, columns].float()
            # Head id -> position among the set's classes (every target is one of them).
            own_targets = (head_targets[:, None] == columns[None, :]).int().argmax(dim=1)
            loss_sum += F.cross_entropy(own_logits, own_targets, reduction="sum").item()
            predictions.extend(own_logits.argmax(dim=-1).tolist())
            targets.extend(own_targets.tolist())
    return {"accuracy": accuracy(predictions, targets), "loss": loss_sum / len(targets)}


def _check_head_size(logits: Tensor, retained: EncodedRetainSet) -> None:
    if logits.dim() != 2 or logits.shape[-1] <= max(retained.label_ids):
        raise ConfigError(f"retain set {retained.name!r} needs head outputs "
                          f"{sorted(retained.label_ids)}, and the model gives logits of shape "
                          f"{tuple(logits.shape)}; pass the label_names of this model's head")


# -- the probe -------------------------------------------------------------------------------

def default_probe_cache() -> Path:
    """`$DELTATUNE_CACHE/probes` (default ~/.cache/deltatune/probes)."""
    return cache_root().parent / "probes"


class ForgettingProbe:
    """KL(base || current) on continuations the base model sampled from PROBE_PROMPTS.

    Build it from the base model, call `capture_reference()` before training (or
    `load_reference(path)` when resuming), then call the probe for `{"probe_kl": ...}`.
    `continuations()` are cached in `cache_dir` (default `default_probe_cache()`) under a
    fingerprint of model_key, the model's config and weights, the prompts and the settings;
    `generated` says whether this probe had to sample them, `seconds` is the wall time it has
    spent in total (fingerprint, generation, reference, calls)."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_key: str, prompts: int = 16,
                 new_tokens: int = 48, top_k: int = 64, cache_dir: str | Path | None = None,
                 seed: int = 0, batch_size: int = 8):
        if not 1 <= prompts <= len(PROBE_PROMPTS):
            raise ConfigError(f"the probe has {len(PROBE_PROMPTS)} prompts; ask for 1 to "
                              f"{len(PROBE_PROMPTS)} (got {prompts})")
        for name, value in (("new_tokens", new_tokens), ("top_k", top_k),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"the probe's {name} must be at least 1, got {value}")
        if not callable(getattr(model, "generate", None)):
            raise ConfigError("the forgetting probe samples text from the model, and "
                              f"{type(model).__name__} cannot generate; use a causal language "
                              "model, or measure a classifier with retain sets (--retain-eval)")
        self.model, self.tokenizer, self.model_key = model, tokenizer, str(model_key)
        self.prompt_texts = list(PROBE_PROMPTS[:prompts])
        self.prompt_ids = [_prompt_ids(tokenizer, text) for text in self.prompt_texts]
        self.new_tokens, self.top_k, self.seed, self.batch_size = new_tokens, top_k, seed, \
            batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_probe_cache()
        self.generated = False
        self.seconds = 0.0
        self._sequences: list[list[int]] | None = None
        self._reference: dict[str, Tensor] | None = None

    # -- continuations --

    def continuations(self) -> list[list[int]]:
        """Prompt + `new_tokens` sampled ids per prompt, from the cache or sampled now."""
        if self._sequences is None:
            started = time.perf_counter()
            path = self.cache_dir / f"{self._cache_key()}.json"
            sequences = self._read_cache(path)
            if sequences is None:
                sequences = self._sample()
                write_json(path, {"format": PROBE_FORMAT, "model_key": self.model_key,
                                  "prompts": self.prompt_texts, "new_tokens": self.new_tokens,
                                  "seed": self.seed, "sequences": sequences})
                self.generated = True
            self._sequences = sequences
            self.seconds += time.perf_counter() - started
        return [list(sequence) for sequence in self._sequences]

    def _cache_key(self) -> str:
        config = getattr(self.model, "config", None)
        described = config.to_dict() if hasattr(config, "to_dict") else {}
        # The same weights read from another folder are the same base model.
        described.pop("_name_or_path", None)
        # batch_size is left out: any batching samples valid continuations, and a cached set
        # is reused whatever the batching.
        key = {"format": PROBE_FORMAT, "model_key": self.model_key, "config": described,
               "weights": model_fingerprint(self.model), "prompt_ids": self.prompt_ids,
               "new_tokens": self.new_tokens, "seed": self.seed, "sampling": SAMPLING}
        text = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _read_cache(self, path: Path) -> list[list[int]] | None:
        """The cached sequences, or None when the file is absent or not what this probe would
        sample (a damaged cache is sampled again, never trusted)."""
        try:
            sequences = json.loads(path.read_text(encoding="utf-8"))["sequences"]
            if self._valid_sequences(sequences):
                return [[int(token) for token in sequence] for sequence in sequences]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _valid_sequences(self, sequences: Any) -> bool:
        return (isinstance(sequences, list) and len(sequences) == len(self.prompt_ids)
                and all(isinstance(sequence, list) and sequence[:len(prompt)] == prompt
                        and len(sequence) == len(prompt) + self.new_tokens
                        for sequence, prompt in zip(sequences, self.prompt_ids)))

    @torch.inference_mode()
    def _sample(self) -> list[list[int]]:
        device, pad_token_id = _device(self.model), _pad_id(self.tokenizer)
        sequences = []
        with evaluation_mode(self.model), _seeded(self.seed, device):
            for chunk in _chunks(self.prompt_ids, self.batch_size):
                batch = {k: v.to(device) for k, v in left_padded(list(chunk),
                                                                 pad_token_id).items()}
                # min = max new tokens: no sequence stops early, so every position is scored.
                output = self.model.generate(**batch, **SAMPLING, max_new_tokens=self.new_tokens,
                                             min_new_tokens=self.new_tokens,
                                             pad_token_id=pad_token_id)
                new = output[:, batch["input_ids"].shape[1]:].tolist()
                sequences += [list(prompt) + row for prompt, row in zip(chunk, new)]
        return sequences

    # -- reference --

    def capture_reference(self) -> None:
        """Keeps the current (base) model's top-k next-token log-probabilities at every
        continuation position."""
        sequences = self.continuations()
        started = time.perf_counter()
        tops, ids, rests = [], [], []
        with torch.inference_mode(), evaluation_mode(self.model):
            for log_probs in self._position_log_probs(sequences):
                k = min(self.top_k, log_probs.shape[-1])
                top, top_ids = log_probs.topk(k, dim=-1)
                tops.append(top.cpu())
                ids.append(top_ids.to(torch.int32).cpu())
                if k < log_probs.shape[-1]:
                    rests.append(torch.logsumexp(log_probs.scatter(1, top_ids, float("-inf")),
                                                 dim=1).cpu())
        self._reference = {"top_log_probs": torch.cat(tops), "top_ids": torch.cat(ids)}
        if rests:
            self._reference["rest_log_probs"] = torch.cat(rests)
        self.seconds += time.perf_counter() - started

    def save_reference(self, path: str | Path) -> None:
        """The reference and its continuations in one safetensors file."""
        reference = self._require_reference()
        sequences = self.continuations()
        lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int64)
        tensors = {**reference,
                   "sequence_ids": torch.tensor([t for s in sequences for t in s],
                                                dtype=torch.int64),
                   "sequence_lengths": lengths,
                   "prompt_lengths": torch.tensor([len(p) for p in self.prompt_ids],
                                                  dtype=torch.int64)}
        write_safetensors(path, tensors, metadata={"format": str(PROBE_FORMAT),
                                                   "new_tokens": str(self.new_tokens),
                                                   "prompts": str(len(self.prompt_ids))})

    def load_reference(self, path: str | Path) -> None:
        """Reads what `save_reference` wrote: the reference and the continuations it belongs
        to (the model need not be the base model any more)."""
        tensors, metadata = _read_reference_file(Path(path))
        if (metadata.get("new_tokens"), metadata.get("prompts")) != \
                (str(self.new_tokens), str(len(self.prompt_ids))):
            raise ConfigError(f"the probe reference {path} was captured with "
                              f"{metadata.get('prompts')} prompts x {metadata.get('new_tokens')} "
                              f"new tokens and this probe asks for {len(self.prompt_ids)} x "
                              f"{self.new_tokens}; resume with the run's own eval.probe_prompts "
                              "and eval.probe_new_tokens")
        lengths = tensors.pop("sequence_lengths").tolist()
        flat = tensors.pop("sequence_ids").tolist()
        prompt_lengths = tensors.pop("prompt_lengths").tolist()
        starts = [sum(lengths[:index]) for index in range(len(lengths))]
        self._sequences = [flat[start:start + length] for start, length in zip(starts, lengths)]
        self.prompt_ids = [sequence[:length]
                           for sequence, length in zip(self._sequences, prompt_lengths)]
        self._reference = tensors

    def _require_reference(self) -> dict[str, Tensor]:
        if self._reference is None:
            raise ConfigError("the forgetting probe has no reference yet: call "
                              "capture_reference() on the base model before training, or "
                              "load_reference(path) when resuming")
        return self._reference

    # -- measuring --

    def __call__(self) -> dict[str, float]:
        reference = self._require_reference()
        sequences = self.continuations()
        started = time.perf_counter()
        kl_sum, start = 0.0, 0
        rest = reference.get("rest_log_probs")
        with torch.inference_mode(), evaluation_mode(self.model):
            for log_probs in self._position_log_probs(sequences):
                stop = start + log_probs.shape[0]
                device = log_probs.device
                kl_sum += cached_kl_divergence_sum(
                    log_probs, reference["top_log_probs"][start:stop].to(device),
                    reference["top_ids"][start:stop].to(device),
                    None if rest is None else rest[start:stop].to(device)).item()
                start = stop
        self.seconds += time.perf_counter() - started
        # Below 1e-12 nats is float64 rounding (the unchanged model gives ~1e-18): report 0.
        return {"probe_kl": max(0.0, round(kl_sum / start, 12))}

    def _position_log_probs(self, sequences: list[list[int]]) -> Iterator[Tensor]:
        """Per batch of sequences, the model's log-probabilities (positions, vocabulary) at the
        positions that predict the continuation tokens, in row-major order. The caller holds
        inference and eval mode (a generator's own context would leak into the caller's code
        between batches)."""
        device, pad_token_id = _device(self.model), _pad_id(self.tokenizer)
        # Right padding: a causal model's real positions never see the padding after them.
        examples = [{"input_ids": sequence,
                     "labels": [IGNORE_INDEX] * len(prompt) + sequence[len(prompt):]}
                    for sequence, prompt in zip(sequences, self.prompt_ids)]
        for chunk in _chunks(examples, self.batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(list(chunk), pad_token_id).items()}
            logits = teacher_logits_for(self.model, batch, causal=True)
            # float64: identical distributions then differ by ~1e-18 nats, not float32's ~1e-9.
            yield F.log_softmax(select_positions(logits, batch).double(), dim=-1)


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The prompt as raw text: its tokens, after a BOS where the tokenizer puts one before text
    (never a trailing EOS/SEP, which would end the text before it is continued)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer(text)["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    if not ids:
        raise ConfigError(f"the tokenizer turns the probe prompt {text!r} into no tokens")
    return ids


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Sampling seeded by `seed`, leaving the global RNG states as they were: the training
    run's determinism depends on them."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _read_reference_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"no probe reference at {path}; it is written when a run starts, so "
                          "start the run afresh instead of resuming it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path} is not a readable probe reference ({error}); start the run "
                          "afresh") from error
    needed = {"top_log_probs", "top_ids", "sequence_ids", "sequence_lengths", "prompt_lengths"}
    if metadata.get("format") != str(PROBE_FORMAT) or not needed <= set(tensors):
        raise ConfigError(f"{path} is not a format-{PROBE_FORMAT} probe reference (tensors "
                          f"{', '.join(sorted(tensors))}); start the run afresh")
    return tensors, metadata
