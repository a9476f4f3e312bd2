"""Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016) as a loss term, and a
cache of the teacher's predictions so a long run does not pay for the teacher's forward at
every step.

`WordLevelKD` is a `LossTerm` (deltatune.train.objectives) with `needs_logits = True`: at every
labelled target position of a causal LM (position t predicts token t+1, labels != -100), or for
every example of a classifier, it adds KL(teacher_T || student_T) * T^2, the softened
distributions at temperature T, averaged over those positions. The objective's loss is then

    loss = ce + weight * kd

so the data term keeps weight 1. Hinton's (1 - a) * CE + a * KD is the same objective with
weight = a / (1 - a) and the learning rate scaled by (1 - a); one knob is enough.

`TeacherCache` stores, once, the teacher's top-k log-probabilities at temperature T and their
token ids at every labelled position (causal LM) or its full class distribution (classifier),
keyed per row by a hash of the row's real tokens and labels, so the student's batches — any
order, any composition, padded — find their rows. With a cache the KL runs over k + 1 buckets:
the teacher's top-k tokens and one remainder bucket holding the rest of the probability mass
(teacher: 1 - sum of its top-k; student: the mass it puts outside those k tokens). That is an
exact KL between two coarse-grained distributions, so it is never larger than the full KL, it is
zero only when the student matches the teacher on the top-k and on the rest's total, and with
k = vocabulary size it equals the full KL. Renormalising the top-k instead would push the student
to put zero mass outside them, sharper than the teacher it imitates.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from deltatune.data.collate import IGNORE_INDEX, model_inputs, pad_batch
from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_safetensors
from deltatune.models.fused_loss import next_token_targets

if TYPE_CHECKING:  # the loss term only reads it; eval/ reuses this module's KL helpers
    from deltatune.train.objectives import ObjectiveOutput

Batch = dict[str, Tensor]

CACHE_FORMAT = 1
CACHE_DESCRIPTION = "teacher_cache.json"
CACHE_TENSORS = "teacher_cache.safetensors"
# Bytes of sha256 kept per row key: 128 bits, collisions are not a concern.
KEY_BYTES = 16
FINGERPRINT_SAMPLES = 4096
PACKED_KEYS = ("cu_seq_lens", "segment_ids")


# -- vocabulary checks -----------------------------------------------------------------------

def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raises ConfigError unless both tokenizers map the same tokens to the same ids: word-level
    KD compares distributions id by id, so a different tokenizer makes the loss meaningless."""
    teacher_vocabulary = teacher_tokenizer.get_vocab()
    student_vocabulary = student_tokenizer.get_vocab()
    if teacher_vocabulary == student_vocabulary:
        return
    differing = sorted(token for token in set(teacher_vocabulary) | set(student_vocabulary)
                       if teacher_vocabulary.get(token) != student_vocabulary.get(token))
    examples = ", ".join(f"{token!r} (teacher id {teacher_vocabulary.get(token)}, student id "
                         f"{student_vocabulary.get(token)})" for token in differing[:5])
    raise ConfigError(
        f"teacher and student must share a tokenizer: vocabulary sizes {len(teacher_vocabulary)}"
        f" (teacher) and {len(student_vocabulary)} (student), {len(differing)} tokens differ, "
        f"e.g. {examples}; pick a teacher of the student's model family, or use sequence-level "
        "KD (deltatune.compress.sequence_kd), which needs only the teacher's text")


def _check_logit_sizes(teacher_size: int, student_size: int, source: str) -> None:
    if teacher_size != student_size:
        raise ConfigError(
            f"teacher and student must share a tokenizer: the {source} has {teacher_size} "
            f"classes/tokens per position and the student {student_size}; pick a teacher with "
            "the student's vocabulary (or, for a classifier, its label set)")


# -- where the KD is taken -------------------------------------------------------------------

def is_classifier_output(logits: Tensor) -> bool:
    """A classifier's logits are (batch, classes); a language model's (batch, positions, vocab)."""
    return logits.dim() == 2


def select_positions(logits: Tensor, batch: Batch) -> Tensor:
    """The logits the KD is taken over, (positions, vocabulary): every example of a classifier,
    the labelled next-token positions of a causal LM in row-major order (row 0's positions
    first, each row's in sequence order)."""
    if is_classifier_output(logits):
        return logits
    mask = next_token_targets(batch["labels"]) != IGNORE_INDEX
    return logits[:, :-1][mask]


def _softened_log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl_divergence_sum(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """sum over rows and buckets of p (log p - log q), p = exp(teacher_log_probs); a bucket the
    teacher gives zero mass contributes zero (xlogy), never NaN."""
    teacher_probs = teacher_log_probs.exp()
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs).sum()


def cached_kl_divergence_sum(student_log_probs: Tensor, top_log_probs: Tensor, top_ids: Tensor,
                             rest_log_probs: Tensor | None) -> Tensor:
    """KL over the teacher's top-k tokens plus the remainder bucket (see the module docstring);
    `rest_log_probs` None means the top-k covers the whole vocabulary."""
    student_top = student_log_probs.gather(1, top_ids.long())
    total = kl_divergence_sum(top_log_probs, student_top)
    if rest_log_probs is None:
        return total
    outside = student_log_probs.scatter(1, top_ids.long(), float("-inf"))
    student_rest = torch.logsumexp(outside, dim=1)
    return total + kl_divergence_sum(rest_log_probs[:, None], student_rest[:, None])


# -- the loss term ---------------------------------------------------------------------------

class WordLevelKD:
    """KL(teacher_T || student_T) * T^2 at the labelled positions (causal LM) or per example
    (classifier), mean over them; total loss = ce + weight * kd. The teacher runs in eval mode
    under no_grad on the batch's model inputs and must sit on the batch's device; with `cache`
    the teacher is not run at all (it may be None)."""

    needs_logits = True

    def __init__(self, teacher: nn.Module | None, temperature: float = 2.0, weight: float = 0.5,
                 name: str = "kd", cache: TeacherCache | None = None):
        if teacher is None and cache is None:
            raise ConfigError("WordLevelKD needs a teacher model or a TeacherCache built from one")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if weight < 0:
            raise ConfigError(f"the KD weight must be zero or more, got {weight}")
        if cache is not None and abs(cache.temperature - temperature) > 1e-12:
            raise ConfigError(f"the teacher cache was built at temperature {cache.temperature} "
                              f"and the KD term asks for {temperature}; use the same value or "
                              "rebuild the cache")
        self.teacher, self.temperature, self.weight = teacher, float(temperature), float(weight)
        self.name, self.cache = name, cache
        self._sizes_checked = False
        if teacher is not None:
            teacher.eval()

    def __call__(self, model: nn.Module, batch: Batch, output: ObjectiveOutput) -> Tensor:
        if output.logits is None:
            raise ConfigError(f"loss term {self.name!r} needs the student's logits, and the "
                              "objective gave none; use deltatune.train.objectives' "
                              "CausalLMObjective or ClassificationObjective")
        student = select_positions(output.logits, batch)
        student_log_probs = _softened_log_probs(student, self.temperature)
        if self.cache is not None:
            kl_sum = self._cached_kl_sum(batch, student_log_probs)
        else:
            kl_sum = self._online_kl_sum(batch, output.logits, student_log_probs)
        return kl_sum * self.temperature ** 2 / max(student.shape[0], 1)

    def _online_kl_sum(self, batch: Batch, student_logits: Tensor,
                       student_log_probs: Tensor) -> Tensor:
        teacher_logits = teacher_logits_for(self.teacher, batch,
                                            causal=not is_classifier_output(student_logits))
        if not self._sizes_checked:
            _check_logit_sizes(teacher_logits.shape[-1], student_logits.shape[-1], "teacher")
            self._sizes_checked = True
        teacher = select_positions(teacher_logits, batch)
        return kl_divergence_sum(_softened_log_probs(teacher, self.temperature),
                                 student_log_probs)

    def _cached_kl_sum(self, batch: Batch, student_log_probs: Tensor) -> Tensor:
        if not self._sizes_checked:
            _check_logit_sizes(self.cache.vocabulary, student_log_probs.shape[-1],
                               "teacher cache")
            self._sizes_checked = True
        top_log_probs, top_ids, rest = self.cache.lookup(batch, student_log_probs.device)
        if top_log_probs.shape[0] != student_log_probs.shape[0]:
            raise ConfigError(
                f"the teacher cache holds {top_log_probs.shape[0]} labelled positions for this "
                f"batch and the student has {student_log_probs.shape[0]}; rebuild the cache "
                "from the training data as it is now")
        return cached_kl_divergence_sum(student_log_probs, top_log_probs, top_ids, rest)


def teacher_logits_for(teacher: nn.Module, batch: Batch, causal: bool) -> Tensor:
    """The teacher's logits for the batch's model inputs, in eval mode, without a graph."""
    parameter = next(teacher.parameters(), None)
    device = batch["input_ids"].device
    if parameter is not None and parameter.device != device:
        raise ConfigError(f"the teacher is on {parameter.device} and the batch on {device}; "
                          f"move the teacher to the student's device (teacher.to('{device}'))")
    teacher.eval()
    extra = {"use_cache": False} if causal else {}
    with torch.no_grad():
        return teacher(**model_inputs(batch), **extra).logits


# -- the teacher cache -----------------------------------------------------------------------

def row_keys(batch: Batch) -> list[bytes]:
    """One key per row: a hash of its real tokens (input_ids where attention_mask is 1) and of
    its labels at those tokens (a classifier's class index), independent of padding."""
    if any(key in batch for key in PACKED_KEYS):
        raise ConfigError("the teacher cache needs padded batches (one example per row); "
                          "switch packing off for a cached KD run")
    input_ids = batch["input_ids"].cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    labels = batch.get("labels", batch.get("label"))
    labels = None if labels is None else labels.cpu()
    keys = []
    for row in range(input_ids.shape[0]):
        digest = hashlib.sha256(input_ids[row][mask[row]].to(torch.int64).numpy().tobytes())
        if labels is not None:
            row_labels = labels[row][mask[row]] if labels.dim() == 2 else labels[row:row + 1]
            digest.update(b"|labels|" + row_labels.to(torch.int64).numpy().tobytes())
        keys.append(digest.digest()[:KEY_BYTES])
    return keys


def _rows_per_position(batch: Batch, causal: bool) -> list[int]:
    """How many of `select_positions`' rows each batch row contributes."""
    if not causal:
        return [1] * batch["input_ids"].shape[0]
    return (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(dim=1).tolist()


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's class, tensor names, shapes, a spread sample of each tensor's
    values (every n-th, about 4096 per tensor) and its sum and norm: tells one teacher from
    another (a fine-tune, a pruned copy) in a fraction of a second, without hashing every
    byte."""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, Tensor) or tensor.is_meta:
                continue
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            try:
                flat = tensor.detach().flatten()
                sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)]
                digest.update(sample.double().cpu().numpy().tobytes())
                if flat.is_floating_point():
                    # Whole-tensor sums catch a change the sample skips (one pruned column).
                    totals = torch.stack([flat.sum(dtype=torch.float32),
                                          torch.linalg.vector_norm(flat, dtype=torch.float32)])
                    digest.update(totals.double().cpu().numpy().tobytes())
            except (RuntimeError, TypeError):
                pass  # a packed quantized buffer: its name, shape and dtype still count
    return digest.hexdigest()[:32]


@dataclass
class _CacheSettings:
    teacher: str
    temperature: float
    requested_top_k: int

    def matches(self, description: dict) -> bool:
        return (description.get("format") == CACHE_FORMAT
                and description.get("teacher_fingerprint") == self.teacher
                and description.get("temperature") == self.temperature
                and description.get("requested_top_k") == self.requested_top_k)


class TeacherCache:
    """The teacher's softened top-k predictions per labelled position, looked up by row key.
    Build with `TeacherCache.build`, reopen with `TeacherCache.open`; `lookup(batch)` returns
    (top_log_probs, top_ids, rest_log_probs or None) aligned with `select_positions`."""

    def __init__(self, folder: Path, description: dict, tensors: dict[str, Tensor]):
        self.folder = folder
        self.description = description
        self.temperature = float(description["temperature"])
        self.top_k = int(description["top_k"])
        self.vocabulary = int(description["vocabulary"])
        self.kind = str(description["kind"])
        self.top_log_probs = tensors["top_log_probs"]
        self.top_ids = tensors["top_ids"]
        self.rest_log_probs = tensors.get("rest_log_probs")
        offsets = tensors["row_offsets"].tolist()
        keys = tensors["row_keys"].numpy()
        self._rows = {keys[index].tobytes(): (offsets[index], offsets[index + 1])
                      for index in range(keys.shape[0])}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: bytes) -> bool:
        return key in self._rows

    @classmethod
    def open(cls, folder: str | Path) -> TeacherCache:
        folder = Path(folder)
        description_path, tensors_path = folder / CACHE_DESCRIPTION, folder / CACHE_TENSORS
        if not description_path.is_file() or not tensors_path.is_file():
            raise ConfigError(f"{folder} holds no teacher cache ({CACHE_DESCRIPTION} and "
                              f"{CACHE_TENSORS}); build one with TeacherCache.build")
        try:
            description = json.loads(description_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{description_path} is not valid JSON ({error}); delete the "
                              "folder and build the cache again") from error
        if not isinstance(description, dict) or description.get("format") != CACHE_FORMAT:
            raise ConfigError(f"{description_path} is not a format-{CACHE_FORMAT} teacher "
                              "cache; delete the folder and build the cache again")
        return cls(folder, description, load_file(str(tensors_path)))

    @classmethod
    def build(cls, teacher: nn.Module, batches: Iterable[Batch] | Sequence[dict],
              folder: str | Path, temperature: float = 2.0, top_k: int = 32,
              progress: bool = False, batch_size: int = 8, pad_token_id: int = 0) -> TeacherCache:
        """Runs the teacher once over `batches` (collated padded batches, or examples that are
        padded here `batch_size` at a time) and writes the cache into `folder`. A folder that
        already holds a cache of the same teacher, temperature and top_k covering every row is
        reused without running the teacher."""
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        folder = Path(folder)
        batches = _as_batches(batches, batch_size, pad_token_id)
        settings = _CacheSettings(model_fingerprint(teacher), float(temperature), int(top_k))
        existing = _reusable_cache(folder, settings, batches)
        if existing is not None:
            return existing
        tensors, description = _compute_cache(teacher, batches, settings, progress)
        write_safetensors(folder / CACHE_TENSORS, tensors)
        # The description is written last: it marks the tensors file as complete.
        write_json(folder / CACHE_DESCRIPTION, description)
        return cls.open(folder)

    def lookup(self, batch: Batch, device: torch.device | str | None = None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The cached rows of `batch`'s examples, concatenated in row order."""
        spans = []
        for row, key in enumerate(row_keys(batch)):
            span = self._rows.get(key)
            if span is None:
                raise ConfigError(
                    f"row {row} of the batch is not in the teacher cache {self.folder}: the data "
                    "changed since it was built (file, template, max_length or limits); rebuild "
                    "it with TeacherCache.build over the current training data")
            spans.append(span)
        index = torch.cat([torch.arange(start, stop) for start, stop in spans]) if spans \
            else torch.zeros(0, dtype=torch.long)
        device = device if device is not None else batch["input_ids"].device
        rest = None if self.rest_log_probs is None else self.rest_log_probs[index].to(device)
        return self.top_log_probs[index].to(device), self.top_ids[index].to(device), rest


def _as_batches(batches: Iterable[Batch] | Sequence[dict], batch_size: int,
                pad_token_id: int) -> list[Batch]:
    items = list(batches)
    if not items:
        raise ConfigError("no batches to build the teacher cache from; pass the training "
                          "batches or examples")
    if isinstance(items[0].get("input_ids"), Tensor):
        return items
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    return [pad_batch(items[start:start + batch_size], pad_token_id)
            for start in range(0, len(items), batch_size)]


def _reusable_cache(folder: Path, settings: _CacheSettings,
                    batches: list[Batch]) -> TeacherCache | None:
    description_path = folder / CACHE_DESCRIPTION
    if not description_path.is_file() or not (folder / CACHE_TENSORS).is_file():
        return None
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if not isinstance(description, dict) or not settings.matches(description):
        return None
    cache = TeacherCache.open(folder)
    wanted = (key for batch in batches for key in row_keys(batch))
    return cache if all(key in cache for key in wanted) else None


def _compute_cache(teacher: nn.Module, batches: list[Batch], settings: _CacheSettings,
                   progress: bool) -> tuple[dict[str, Tensor], dict]:
    was_training = teacher.training
    device = next(teacher.parameters()).device
    seen: set[bytes] = set()
    keys, counts, top_log_probs, top_ids, rests = [], [], [], [], []
    vocabulary, causal = None, None
    try:
        for batch in tqdm(batches, desc="teacher cache", unit="batch", disable=not progress):
            batch = {name: value.to(device) for name, value in batch.items()
                     if isinstance(value, Tensor)}
            causal = _batch_is_causal(batch)
            logits = teacher_logits_for(teacher, batch, causal)
            vocabulary = logits.shape[-1]
            k = vocabulary if not causal else min(settings.requested_top_k, vocabulary)
            log_probs = _softened_log_probs(select_positions(logits, batch),
                                            settings.temperature)
            values, ids = log_probs.topk(k, dim=-1)
            rest = torch.logsumexp(log_probs.scatter(1, ids, float("-inf")), dim=1) \
                if k < vocabulary else None
            position = 0
            for key, count in zip(row_keys(batch), _rows_per_position(batch, causal)):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
                    counts.append(count)
                    top_log_probs.append(values[position:position + count].cpu())
                    top_ids.append(ids[position:position + count].to(torch.int32).cpu())
                    if rest is not None:
                        rests.append(rest[position:position + count].cpu())
                position += count
    finally:
        teacher.train(was_training)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {"top_log_probs": torch.cat(top_log_probs), "top_ids": torch.cat(top_ids),
               "row_offsets": offsets,
               "row_keys": torch.frombuffer(bytearray(b"".join(keys)),
                                            dtype=torch.uint8).reshape(len(keys), KEY_BYTES)}
    if rests:
        tensors["rest_log_probs"] = torch.cat(rests)
    description = {"format": CACHE_FORMAT, "teacher": type(teacher).__name__,
                   "teacher_name_or_path": str(getattr(getattr(teacher, "config", None),
                                                       "name_or_path", "") or ""),
                   "teacher_fingerprint": settings.teacher, "temperature": settings.temperature,
                   "requested_top_k": settings.requested_top_k,
                   "top_k": int(tensors["top_ids"].shape[1]), "vocabulary": int(vocabulary),
                   "kind": "causal-lm" if causal else "classification", "rows": len(keys),
                   "positions": int(offsets[-1])}
    return tensors, description


def _batch_is_causal(batch: Batch) -> bool:
    """A causal-LM batch has per-token labels (batch, positions); a classifier's one per row."""
    labels = batch.get("labels", batch.get("label"))
    if labels is None:
        raise ConfigError("the teacher cache needs labelled batches: `labels` per token (causal "
                          "LM) or `label`/`labels` per example (classification)")
    return labels.dim() == 2
