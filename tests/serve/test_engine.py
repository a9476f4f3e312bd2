"""The generation engine: greedy output equals transformers' `generate` with the adapter applied
alone, a mixed-adapter batch of prompts of different lengths equals each request run alone, the
swap policy gives the same answers, per-request max_tokens / stop / seed / top_p, streamed
events add up to the answer, run-time bank changes between batches, and errors per request.
A tiny random Llama with SmolLM2's real tokenizer (so decoding and the end tokens are real)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.eval.evaluate import stop_token_ids
from deltatune.methods import config_class
from deltatune.methods.adapter_io import load_adapter, save_adapter
from deltatune.serve.bank import AdapterBank
from deltatune.serve.engine import (GenerationEngine, GenerationRequest, SamplingParams,
                                    _safe_end)
from tests.conftest import tiny_llama

VOCAB = 49152



def _model():
    return tiny_llama(vocab_size=VOCAB)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    specs = {"a": ("lora", {"r": 4, "targets": ["q_proj", "v_proj"]}),
             "b": ("lora", {"r": 2, "targets": ["all-linear"], "use_dora": True}),
             "c": ("ia3", {"targets": ["k_proj", "v_proj", "down_proj"],
                           "feedforward_targets": ["down_proj"]})}
    dirs = {}
    for index, (name, (method, options)) in enumerate(specs.items()):
        handle = deltatune.apply(_model(), config_class(method).from_options(options))
        generator = torch.Generator().manual_seed(index + 10)
        with torch.no_grad():
            for parameter in handle.trainable_parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        dirs[name] = tmp_path_factory.mktemp(name)
        save_adapter(handle, dirs[name])
    return dirs


def _engine(tokenizer, adapter_dirs, policy="mixed", **options) -> GenerationEngine:
    model = _model()
    bank = AdapterBank(model)
    for name, directory in adapter_dirs.items():
        bank.load(name, directory)
    return GenerationEngine(model, tokenizer, bank, policy=policy, **options)


def _reference(tokenizer, directory, prompt_ids, max_tokens) -> str:
    """transformers' own greedy generate on a model with the adapter applied alone."""
    model = _model()
    if directory is not None:
        load_adapter(model, directory)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_token_ids(tokenizer))
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,",
           "A long prompt that has quite a few more tokens than the others in this batch"]


def _greedy(tokenizer, prompt, adapter, max_tokens=8):
    return GenerationRequest(tokenizer.encode(prompt), adapter,
                             SamplingParams(max_tokens=max_tokens, temperature=0))


def test_mixed_batch_equals_each_request_alone(tokenizer, adapter_dirs):
    engine = _engine(tokenizer, adapter_dirs)
    cases = [(p, a) for p in PROMPTS for a in (None, "a", "b", "c")]
    results = engine.generate([_greedy(tokenizer, p, a) for p, a in cases])
    assert engine.stats["batches"] == 1
    for (prompt, adapter), (text, reason) in zip(cases, results):
        expected = _reference(tokenizer, adapter_dirs[adapter] if adapter else None,
                              tokenizer.encode(prompt), 8)
        assert text == expected, (prompt, adapter)
        assert reason in ("length", "stop")
    # the adapters change the answers
    by_adapter = {a: [t for (p, aa), (t, _) in zip(cases, results) if aa == a]
                  for a in (None, "a", "b", "c")}
    assert len({tuple(v) for v in by_adapter.values()}) == 4


def test_swap_policy_gives_the_same_answers(tokenizer, adapter_dirs):
    cases = [(p, a) for p in PROMPTS[:2] for a in ("a", "b", None, "c")]
    mixed = _engine(tokenizer, adapter_dirs).generate(
        [_greedy(tokenizer, p, a) for p, a in cases])
    swap_engine = _engine(tokenizer, adapter_dirs, policy="swap")
    swapped = swap_engine.generate([_greedy(tokenizer, p, a) for p, a in cases])
    assert swapped == mixed
    assert swap_engine.stats["batches"] == len(cases)  # adapters alternate: one per batch
    assert swap_engine.policy.swaps == 6
    assert swap_engine.bank.merged_adapter == "c"
    grouped_engine = _engine(tokenizer, adapter_dirs, policy="swap-grouped")
    grouped = grouped_engine.generate([_greedy(tokenizer, p, a) for p, a in cases])
    assert grouped == mixed
    assert grouped_engine.stats["batches"] == 4  # one batch per adapter (and one for the base)
    assert grouped_engine.policy.swaps == 3


def test_limits_stop_seed_and_top_p(tokenizer, adapter_dirs):
    engine = _engine(tokenizer, adapter_dirs)
    ids = tokenizer.encode(PROMPTS[0])
    (text, reason), = engine.generate([GenerationRequest(ids, "a", SamplingParams(
        max_tokens=5, temperature=0))])
    assert reason == "length"
    full, _ = engine.generate([_greedy(tokenizer, PROMPTS[0], "a", 12)])[0]
    stop = full[3:6]
    (cut, reason), = engine.generate([GenerationRequest(ids, "a", SamplingParams(
        max_tokens=12, temperature=0, stop=[stop]))])
    assert reason == "stop" and cut == full[:full.find(stop)]
    sampled = [GenerationRequest(ids, "b", SamplingParams(max_tokens=10, temperature=1.0,
                                                          seed=seed)) for seed in (1, 1, 2)]
    first, again, other = engine.generate(sampled)
    assert first == again and first != other
    (nucleus, _), = engine.generate([GenerationRequest(ids, "b", SamplingParams(
        max_tokens=10, temperature=1.0, top_p=1e-6, seed=5))])
    assert nucleus == engine.generate([_greedy(tokenizer, PROMPTS[0], "b", 10)])[0][0]


def test_stop_strings_are_held_back_while_streaming():
    assert _safe_end("hello wor", ["world"]) == 6
    assert _safe_end("hello", ["xyz"]) == 5
    assert _safe_end("caf\ufffd", []) == 3


def test_threaded_engine_streams_and_changes_the_bank(tokenizer, adapter_dirs):
    engine = _engine(tokenizer, {"a": adapter_dirs["a"]}, batch_wait_ms=20)
    engine.start()
    try:
        done = threading.Event()
        events = {i: [] for i in range(3)}
        remaining = [3]

        def collector(i):
            def on_event(event):
                events[i].append(event)
                if event.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
            return on_event

        for i, adapter in enumerate(["a", None, "a"]):
            engine.submit(_greedy(tokenizer, PROMPTS[i], adapter, 10), collector(i))
        assert done.wait(60)
        for i, adapter in enumerate(["a", None, "a"]):
            streamed = "".join(e.text for e in events[i])
            expected = _reference(tokenizer, adapter_dirs[adapter] if adapter else None,
                                  tokenizer.encode(PROMPTS[i]), 10)
            assert streamed == expected
            assert [e.finished for e in events[i]].count(True) == 1 and events[i][-1].finished
            assert events[i][-1].completion_tokens <= 10
        info = engine.call_between_batches(
            lambda: engine.bank.load("c", adapter_dirs["c"])).result(timeout=30)
        assert info.name == "c" and "c" in engine.bank
        engine.call_between_batches(lambda: engine.bank.unload("a")).result(timeout=30)
        finished = threading.Event()
        last = []
        engine.submit(_greedy(tokenizer, PROMPTS[0], "a"),
                      lambda e: (last.append(e), e.finished and finished.set()))
        assert finished.wait(30)
        assert last[-1].finish_reason == "error" and "not loaded" in last[-1].error
        failing = engine.call_between_batches(lambda: engine.bank.unload("zzz"))
        with pytest.raises(Exception, match="no adapter named"):
            failing.result(timeout=30)
    finally:
        engine.stop()
