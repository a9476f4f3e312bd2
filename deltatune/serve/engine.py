"""Batched text generation for the server: `GenerationEngine` runs one background thread that
takes waiting requests, forms a batch (a `BatchingPolicy` decides which requests go together and
how the adapter bank is set up for them), and decodes it with a KV cache: one prefill of the
left-padded prompts, then one forward per new token for every row still running. Each row keeps
its own sampling settings (greedy or temperature / top-p with its own seeded generator), its own
`max_tokens` and `stop` strings; finished rows leave the batch (and the cache) at once.

Policies: `MixedBatching` puts requests for any adapters in one batch and routes each row to its
adapter (`AdapterBank.route`); `SwapBatching` is the baseline most servers have — a batch holds
one adapter's requests only, in arrival order, and that adapter is merged into the base before
it runs. Micro-batching: requests that arrive while a batch runs wait for the next one.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
from transformers import DynamicCache

from deltatune.errors import ConfigError
from deltatune.eval.evaluate import stop_token_ids
from deltatune.serve.bank import AdapterBank

T = TypeVar("T")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None           # None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationEvent:
    """New text for one request; the last event of a request has `finished` True."""
    text: str
    finished: bool
    finish_reason: str | None     # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


EventCallback = Callable[[GenerationEvent], None]


@dataclass
class _Pending:
    request: GenerationRequest
    on_event: EventCallback
    arrived: float


# -- batching policies -----------------------------------------------------------------------

class BatchingPolicy:
    """Which waiting requests form the next batch, and how the bank is set up for it."""
    name = ""

    def take(self, waiting: deque[_Pending], max_batch_size: int) -> list[_Pending]:
        raise NotImplementedError

    def prepare(self, bank: AdapterBank, adapters: list[str | None]) -> list[str | None]:
        """Sets up the bank for a batch of these adapters; returns each row's routing name."""
        raise NotImplementedError


class MixedBatching(BatchingPolicy):
    """Up to `max_batch_size` requests in arrival order, whatever their adapters."""
    name = "mixed"

    def take(self, waiting, max_batch_size):
        batch = [waiting.popleft() for _ in range(min(max_batch_size, len(waiting)))]
        # Rows of one adapter side by side: the bank then works on views of contiguous rows.
        order = {name: i for i, name in enumerate(dict.fromkeys(p.request.adapter for p in batch))}
        return sorted(batch, key=lambda p: order[p.request.adapter])

    def prepare(self, bank, adapters):
        bank.unmerge()
        return adapters


class SwapBatching(BatchingPolicy):
    """The oldest request's adapter and the requests right behind it that use the same one;
    that adapter is merged into the base weights (swapped in) for the batch."""
    name = "swap"

    def __init__(self) -> None:
        self.swaps = 0
        self.swap_seconds = 0.0

    def take(self, waiting, max_batch_size):
        batch = [waiting.popleft()]
        while waiting and len(batch) < max_batch_size \
                and waiting[0].request.adapter == batch[0].request.adapter:
            batch.append(waiting.popleft())
        return batch

    def prepare(self, bank, adapters):
        name = adapters[0]
        if name is None:
            bank.unmerge()
        elif bank.merged_adapter != name:
            self.swap_seconds += bank.merge(name)
            self.swaps += 1
        return [None] * len(adapters)


class GroupedSwapBatching(SwapBatching):
    """Like `swap`, but the batch takes every waiting request of the oldest request's adapter,
    wherever it is in the queue: fewer swaps and full batches, at the cost of making the other
    adapters' requests wait (a single-adapter server that sorts its queue)."""
    name = "swap-grouped"

    def take(self, waiting, max_batch_size):
        adapter = waiting[0].request.adapter
        batch = [p for p in waiting if p.request.adapter == adapter][:max_batch_size]
        taken = {id(p) for p in batch}
        rest = [p for p in waiting if id(p) not in taken]
        waiting.clear()
        waiting.extend(rest)
        return batch


POLICIES: dict[str, Callable[[], BatchingPolicy]] = {
    "mixed": MixedBatching, "swap": SwapBatching, "swap-grouped": GroupedSwapBatching}


def make_policy(name: str) -> BatchingPolicy:
    if name not in POLICIES:
        raise ConfigError(f"batching policy {name!r} is unknown; use one of {sorted(POLICIES)}")
    return POLICIES[name]()


# -- one row's decoding state ----------------------------------------------------------------

class _Row:
    """A request being decoded: its tokens, its sampler and its stop rules."""

    def __init__(self, pending: _Pending, tokenizer: Any, eos_ids: set[int]):
        self.pending = pending
        self.params = pending.request.params
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.generated: list[int] = []
        self.sent_chars = 0
        self.finish_reason: str | None = None
        self.generator = None
        if self.params.temperature > 0:
            seed = self.params.seed if self.params.seed is not None \
                else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def prompt_tokens(self) -> int:
        return len(self.pending.request.prompt_ids)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's (fp32) logits."""
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probs = _top_p(probs, self.params.top_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def add(self, token: int) -> None:
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return
        self.generated.append(token)
        if len(self.generated) >= self.params.max_tokens:
            self.finish_reason = "length"

    def text_event(self) -> GenerationEvent | None:
        """The new text since the last event (held back while it may still become a stop
        string or ends in an incomplete character); None when there is nothing to say."""
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        stop_at = _first_stop(text, self.params.stop)
        if stop_at is not None:
            text = text[:stop_at]
            self.finish_reason = "stop"
        finished = self.finish_reason is not None
        end = len(text) if finished else _safe_end(text, self.params.stop)
        new = text[self.sent_chars:end] if end > self.sent_chars else ""
        if not new and not finished:
            return None
        self.sent_chars = max(self.sent_chars, end)
        return GenerationEvent(text=new, finished=finished, finish_reason=self.finish_reason,
                               prompt_tokens=self.prompt_tokens,
                               completion_tokens=len(self.generated))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: the smallest set of tokens whose probability reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop = cumulative - sorted_probs > top_p
    sorted_probs[drop] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent: not a trailing part that starts a stop string, and not
    an incomplete multi-byte character (the tokenizer shows it as U+FFFD)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for length in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:length]):
                end = min(end, len(text[:end]) - length)
                break
    return end


# -- the engine ------------------------------------------------------------------------------

class GenerationEngine:
    """The serving loop (see the module docstring). `submit` is thread-safe; `on_event` is
    called on the engine thread, so it must only hand the event over (e.g. to an asyncio
    loop with `call_soon_threadsafe`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, bank: AdapterBank, *,
                 max_batch_size: int = 32, batch_wait_ms: float = 5.0, policy: str = "mixed"):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bank = bank
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self.policy = make_policy(policy)
        self.eos_ids = set(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else min(self.eos_ids)
        self.device = next(model.parameters()).device
        self._waiting: deque[_Pending] = deque()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = {"batches": 0, "rows": 0, "generated_tokens": 0, "forward_passes": 0}

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # -- the outside -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        with self._wake:
            self._waiting.append(_Pending(request, on_event, time.perf_counter()))
            self._wake.notify_all()

    def call_between_batches(self, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        """Runs `fn` on the engine thread while no batch is running (bank changes at run
        time); the engine must be started."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        with self._wake:
            self._wake.notify_all()
        return future

    def generate(self, requests: Sequence[GenerationRequest]) -> list[tuple[str, str]]:
        """Runs `requests` as they would be served (in this thread, engine not started);
        returns each one's (text, finish_reason). For tests and offline use."""
        results: list[list] = [["", None] for _ in requests]
        for index, request in enumerate(requests):
            self._waiting.append(_Pending(request, _collector(results[index]),
                                          time.perf_counter()))
        while self._waiting:
            self._run_batch(self.policy.take(self._waiting, self.max_batch_size))
        return [(text, reason) for text, reason in results]

    # -- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._waiting and self._calls.empty():
                    self._wake.wait(timeout=0.5)
                if not self._running:
                    break
            self._run_calls()
            if not self._waiting:
                continue
            if len(self._waiting) < self.max_batch_size and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            with self._wake:
                batch = self.policy.take(self._waiting, self.max_batch_size)
            self._run_batch(batch)
        self._fail_waiting("the server is shutting down")

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)

    def _fail_waiting(self, message: str) -> None:
        with self._wake:
            pending, self._waiting = list(self._waiting), deque()
        for item in pending:
            _send(item.on_event, _error_event(item.request, message))

    # -- one batch ---------------------------------------------------------------------------
    def _run_batch(self, batch: list[_Pending]) -> None:
        batch = [item for item in batch if self._adapter_available(item)]
        if not batch:
            return
        try:
            with self.bank.lock:
                names = self.policy.prepare(self.bank, [i.request.adapter for i in batch])
            self._decode(batch, names)
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the server
            for item in batch:
                _send(item.on_event, _error_event(item.request, f"generation failed: {error}"))

    def _adapter_available(self, item: _Pending) -> bool:
        if not item.request.prompt_ids:
            _send(item.on_event, _error_event(item.request, "the prompt is empty"))
            return False
        name = item.request.adapter
        if name is None or name in self.bank:
            return True
        _send(item.on_event, _error_event(item.request, f"adapter '{name}' is not loaded"))
        return False

    @torch.inference_mode()
    def _decode(self, batch: list[_Pending], names: list[str | None]) -> None:
        rows = [_Row(item, self.tokenizer, self.eos_ids) for item in batch]
        input_ids, attention_mask = self._left_padded([item.request.prompt_ids for item in batch])
        positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache()
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        logits = self._forward(names, input_ids, attention_mask, positions, cache)
        next_position = positions[:, -1] + 1
        while rows:
            tokens = [row.choose(logits[i]) for i, row in enumerate(rows)]
            for row, token in zip(rows, tokens):
                row.add(token)
                event = row.text_event()
                if event is not None:
                    _send(row.pending.on_event, event)
            self.stats["generated_tokens"] += len(rows)
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if not keep:
                break
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                rows = [rows[i] for i in keep]
                names = [names[i] for i in keep]
                attention_mask = attention_mask[keep]
                next_position = next_position[keep]
                tokens = [tokens[i] for i in keep]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            step_ids = torch.tensor(tokens, device=self.device).view(-1, 1)
            logits = self._forward(names, step_ids, attention_mask,
                                   next_position.view(-1, 1), cache)
            next_position = next_position + 1

    def _forward(self, names: list[str | None], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        self.stats["forward_passes"] += 1
        with self.bank.lock, self.bank.route(names):
            output = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=positions, past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
        return output.logits[:, -1, :].float()

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            if prompt:
                ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                mask[i, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)


def _send(on_event: EventCallback, event: GenerationEvent) -> None:
    try:
        on_event(event)
    except Exception:  # noqa: BLE001 - a client that went away must not stop the batch
        pass


def _error_event(request: GenerationRequest, message: str) -> GenerationEvent:
    return GenerationEvent(text="", finished=True, finish_reason="error",
                           prompt_tokens=len(request.prompt_ids), completion_tokens=0,
                           error=message)


def _collector(slot: list) -> EventCallback:
    def collect(event: GenerationEvent) -> None:
        slot[0] += event.text
        if event.finished:
            slot[1] = event.error or event.finish_reason
    return collect


__all__ = ["GenerationEngine", "GenerationRequest", "GenerationEvent", "SamplingParams",
           "BatchingPolicy", "MixedBatching", "SwapBatching", "make_policy"]
