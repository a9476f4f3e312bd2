"""`deltatune serve`: the OpenAI-compatible app. Unit tests on a tiny random Llama with SmolLM2's
real tokenizer (response shapes, streaming, the adapter picked by `model`, errors in OpenAI's
shape, the body cap, the API key, run-time adapter loading inside the allowed folder, the CLI's
flags); the acceptance test runs the real server on real uvicorn with smollm2-135m and two LoRA
adapters and checks, through the `openai` client, that every answer equals `deltatune
generate`'s for the same prompt and adapter."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

import deltatune
from deltatune.methods import config_class
from deltatune.methods.adapter_io import save_adapter
from deltatune.serve.bank import AdapterBank
from deltatune.serve.engine import GenerationEngine
from deltatune.serve.server import ServerLimits, ServerState, build_app
from tests.conftest import tiny_llama
from tests.serve.test_engine import VOCAB

BASE = "tiny"
KEY = "sk-test-key"



def _model():
    return tiny_llama(vocab_size=VOCAB)


def make_adapters(root: Path, names: tuple[str, ...] = ("a", "b")) -> dict[str, Path]:
    """LoRA adapters for the tiny model, noisy enough to change its answers."""
    dirs = {}
    for index, name in enumerate(names):
        handle = deltatune.apply(_model(), config_class("lora").from_options(
            {"r": 4, "targets": ["q_proj", "v_proj"]}))
        generator = torch.Generator().manual_seed(index + 20)
        with torch.no_grad():
            for parameter in handle.trainable_parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        dirs[name] = root / name
        save_adapter(handle, dirs[name])
    return dirs


def make_state(tokenizer, adapters: dict[str, Path], **limits) -> ServerState:
    model = _model()
    bank = AdapterBank(model)
    for name, folder in adapters.items():
        bank.load(name, folder)
    engine = GenerationEngine(model, tokenizer, bank, max_batch_size=8, batch_wait_ms=2)
    return ServerState(engine, bank, tokenizer, BASE, ServerLimits(**limits))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """The app on real uvicorn in a background thread; yields its base URL (…/v1)."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(root)
    return root


@pytest.fixture(scope="module")
def client(tokenizer, adapter_root) -> Iterator[TestClient]:
    state = make_state(tokenizer, {"a": adapter_root / "a", "b": adapter_root / "b"},
                       adapter_dir=adapter_root, max_tokens_limit=64, max_prompt_tokens=48,
                       max_body_bytes=20_000)
    with TestClient(build_app(state), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_error(response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def _completion(client, model=BASE, **fields):
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, **fields}
    return client.post("/v1/completions", json=body)


def _chat(client, model=BASE, **fields):
    body = {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello"}],
            "max_tokens": 6, "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def _sse_chunks(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- shapes ----------------------------------------------------------------------------------

def test_models_lists_base_and_adapters(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [BASE, "a", "b"]
    base, adapter = listing["data"][0], listing["data"][1]
    assert base["object"] == "model" and base["owned_by"] == "deltatune" and "parent" not in base
    assert adapter["parent"] == BASE and isinstance(adapter["created"], int)


def test_completion_shape_and_adapter_routing(client, tokenizer):
    answers = {}
    for model in (BASE, "a", "b"):
        body = _completion(client, model).json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == model
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert choice["finish_reason"] in ("length", "stop")
        prompt_tokens = len(tokenizer("The capital of France is")["input_ids"])
        assert body["usage"] == {"prompt_tokens": prompt_tokens,
                                 "completion_tokens": body["usage"]["completion_tokens"],
                                 "total_tokens": prompt_tokens
                                 + body["usage"]["completion_tokens"]}
        answers[model] = choice["text"]
    assert len(set(answers.values())) == 3  # each adapter changes the answer


def test_chat_shape_and_prompt_equals_generate(client, tokenizer):
    from deltatune.data.templates import render_prompt
    body = _chat(client).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    expected = render_prompt("Hello", tokenizer, "chat", system="Be brief.")
    assert body["usage"]["prompt_tokens"] == len(expected)
    # the chat template on its own gives the same ids as `deltatune generate`'s prompt
    direct = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        tokenize=True, add_generation_prompt=True)
    assert list(direct["input_ids"] if not isinstance(direct, list) else direct) == expected


def test_raw_prompt_is_untemplated(tokenizer):
    from deltatune.data.templates import raw_prompt_ids, render_prompt
    assert raw_prompt_ids("Hello world", tokenizer) == tokenizer("Hello world")["input_ids"]
    # `deltatune generate --template none` feeds the prompt plus a newline
    assert render_prompt("Hello world", tokenizer, "none") == \
        raw_prompt_ids("Hello world\n", tokenizer)


def test_streaming_adds_up_to_the_answer(client):
    whole = _completion(client, "a").json()["choices"][0]["text"]
    streamed = client.post("/v1/completions", json={
        "model": "a", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
        "stream": True})
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _sse_chunks(streamed.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    whole_chat = _chat(client, "b").json()["choices"][0]["message"]["content"]
    streamed = _chat(client, "b", stream=True)
    chunks = _sse_chunks(streamed.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole_chat
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_seed_and_limits(client):
    base = _completion(client, max_tokens=12).json()["choices"][0]["text"]
    word = base.strip().split()[1] if len(base.strip().split()) > 1 else base.strip()[:2]
    stopped = _completion(client, max_tokens=12, stop=[word]).json()["choices"][0]
    assert word not in stopped["text"] and stopped["finish_reason"] == "stop"
    assert base.startswith(stopped["text"])
    first = _completion(client, "a", temperature=1.0, seed=7, max_tokens=10).json()
    again = _completion(client, "a", temperature=1.0, seed=7, max_tokens=10).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    texts = {_completion(client, "a", temperature=1.0, seed=s, max_tokens=10).json()
             ["choices"][0]["text"] for s in range(4)}
    assert len(texts) > 1
    # no max_tokens: 16 for completions, as OpenAI
    assert _completion(client, max_tokens=None).json()["usage"]["completion_tokens"] <= 16


# -- errors ----------------------------------------------------------------------------------

def test_request_errors(client):
    assert assert_error(_completion(client, "nope"), 404, "model")["code"] == "model_not_found"
    assert_error(_completion(client, max_tokens=65), 400, "max_tokens")
    assert_error(_completion(client, max_tokens=0), 400, "max_tokens")
    assert_error(_completion(client, max_tokens=2.0), 400, "max_tokens")
    assert_error(_completion(client, max_tokens="3"), 400, "max_tokens")
    assert_error(_completion(client, temperature=2.5), 400, "temperature")
    assert_error(_completion(client, top_p=-0.1), 400, "top_p")
    assert_error(_completion(client, n=2), 400, "n")
    assert_error(_completion(client, prompt=""), 400, "prompt")
    assert_error(_completion(client, prompt=["a"]), 400, "prompt")
    assert_error(_completion(client, stop=["a", "b", "c", "d", "e"]), 400, "stop")
    assert_error(_completion(client, stop=[1]), 400, "stop")
    assert_error(_completion(client, prompt="word " * 60), 400, "max_tokens")  # prompt too long
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 400, "model")
    assert_error(_chat(client, messages=[]), 400, "messages")
    assert_error(_chat(client, messages=[{"role": "robot", "content": "x"}]), 400, "messages")
    assert_error(_chat(client, messages=[{"role": "user"}]), 400, "messages")
    assert_error(client.post("/v1/completions", content=b"{\"model\": ",
                             headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)
    assert_error(client.delete("/v1/models"), 405)


def test_body_cap_counts_content_length_and_chunked_bytes(client):
    big = json.dumps({"model": BASE, "prompt": "x" * 30_000}).encode()
    assert_error(client.post("/v1/completions", content=big,
                             headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for _ in range(30):
            yield b" " * 1000
    response = client.post("/v1/completions", content=chunks(),
                           headers={"content-type": "application/json"})
    assert_error(response, 413)


def test_unexpected_exception_is_a_500_and_the_server_keeps_serving(client, monkeypatch):
    import deltatune.serve.server as server_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(server_module, "raw_prompt_ids", broken)
    error = assert_error(_completion(client), 500)
    assert error["type"] == "server_error"
    monkeypatch.undo()
    assert _completion(client).status_code == 200


def test_api_key(tokenizer, adapter_root):
    state = make_state(tokenizer, {}, api_key=KEY)
    with TestClient(build_app(state)) as key_client:
        error = assert_error(key_client.get("/v1/models"), 401)
        assert error["type"] == "authentication_error"
        assert_error(key_client.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
                     401)
        assert_error(key_client.post("/v1/completions", json={"model": BASE},
                                     headers={"Authorization": KEY}), 401)
        assert_error(key_client.get("/v1/nothing"), 401)  # the key comes first
        ok = key_client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_adapters_at_run_time(client, adapter_root, tmp_path):
    response = client.post("/v1/adapters", json={"name": "a2", "path": "a"})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "a2"
    listed = client.get("/v1/adapters").json()["data"]
    assert {"a", "b", "a2"} <= {entry["name"] for entry in listed}
    assert "a2" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    # the same folder under another name gives the same answers
    assert _completion(client, "a2").json()["choices"][0]["text"] == \
        _completion(client, "a").json()["choices"][0]["text"]
    assert client.delete("/v1/adapters/a2").status_code == 200
    assert_error(_completion(client, "a2"), 404, "model")
    assert_error(client.delete("/v1/adapters/a2"), 404)

    outside = make_adapters(tmp_path, ("c",))["c"]
    assert_error(client.post("/v1/adapters", json={"name": "c", "path": str(outside)}), 403,
                 "path")
    assert_error(client.post("/v1/adapters", json={"name": "c", "path": "../" + outside.name}),
                 403, "path")
    (adapter_root / "link").symlink_to(outside, target_is_directory=True)
    assert_error(client.post("/v1/adapters", json={"name": "c", "path": "link"}), 403, "path")
    assert_error(client.post("/v1/adapters", json={"name": "bad name", "path": "a"}), 400,
                 "name")
    assert_error(client.post("/v1/adapters", json={"name": "ok\n", "path": "a"}), 400, "name")
    assert_error(client.post("/v1/adapters", json={"name": BASE, "path": "a"}), 400, "name")
    assert_error(client.post("/v1/adapters", json={"name": "a", "path": "b"}), 409, "name")
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "missing"}), 400)
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "a\x00b"}), 400)
    (adapter_root / "empty").mkdir()
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "empty"}), 400)


def test_run_time_loading_is_off_without_adapter_dir(tokenizer, adapter_root):
    with TestClient(build_app(make_state(tokenizer, {}))) as plain:
        error = assert_error(plain.post("/v1/adapters", json={"name": "a", "path": "a"}), 403)
        assert "--adapter-dir" in error["message"] and error["type"] == "permission_error"


def test_engine_errors_become_statuses():
    from deltatune.serve.engine import GenerationEvent
    from deltatune.serve.server import _event_error

    def status(message):
        return _event_error(GenerationEvent("", True, "error", 3, 0, message)).status
    assert status("adapter 'a' is not loaded") == 404   # unloaded while the request waited
    assert status("the prompt is empty") == 400
    assert status("generation failed: out of memory") == 500


# -- the command line ------------------------------------------------------------------------

def test_cli_flags_and_help():
    from deltatune.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--port", "0", "--policy", "swap",
                              "--max-batch-size", "4", "--batch-wait-ms", "20",
                              "--adapter", "a0=/x", "--adapter", "a1=/y"])
    assert (args.port, args.policy, args.max_batch_size, args.batch_wait_ms) == \
        (0, "swap", 4, 20.0)
    assert args.host == "127.0.0.1" and args.adapter == ["a0=/x", "a1=/y"]
    text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for needle in ("OpenAI", "curl", "from openai import OpenAI", "--adapter-dir", "127.0.0.1"):
        assert needle in text


def test_cli_errors_are_one_line(capsys):
    from deltatune.cli import main
    assert main(["serve", "--model", "m", "--adapter", "noequals"]) == 2
    assert main(["serve", "--model", "m", "--max-tokens-limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_cli_serves_a_model_folder(tokenizer, adapter_root, tmp_path):
    """`deltatune serve` as benchmarks/serve_load.py starts it: a local folder, --port 0 (the
    printed line names the port), adapters by flag; GET /v1/models answers."""
    import os
    import subprocess
    import sys

    import httpx
    folder = tmp_path / "tiny-folder"
    _model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    command = [sys.executable, "-m", "deltatune", "serve", "--model", str(folder), "--port", "0",
               "--policy", "swap", "--max-batch-size", "4", "--batch-wait-ms", "20",
               "--adapter", f"a0={adapter_root / 'a'}"]
    env = {**os.environ, "DELTATUNE_API_KEY": KEY}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        line = process.stdout.readline()
        assert line.startswith("serving tiny-folder + adapters ['a0'] on http://"), line
        url = line.split(" on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port > 0
        local = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(local + "/models", timeout=30).status_code == 401  # the env key
        models = httpx.get(local + "/models", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=30)
        assert [m["id"] for m in models.json()["data"]] == ["tiny-folder", "a0"]
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "warning" not in process.stderr.read()


def test_cli_warns_on_a_public_host_without_key(tokenizer, capsys, monkeypatch):
    import uvicorn

    import deltatune.models
    from deltatune import cli_serve
    from deltatune.cli import build_parser
    from deltatune.models.loading import LoadedModel
    monkeypatch.delenv("DELTATUNE_API_KEY", raising=False)
    monkeypatch.setattr(deltatune.models, "load_model", lambda *a, **k: LoadedModel(
        _model(), tokenizer, "tiny", "memory", "causal-lm"))
    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(sockets))
    args = build_parser().parse_args(["serve", "--model", "tiny", "--host", "0.0.0.0",
                                      "--port", "0"])
    assert cli_serve.cmd_serve(args) == 0
    ran[0][0].close()  # bound, never listened on: nothing was exposed
    out, err = capsys.readouterr()
    assert out.startswith("serving tiny + adapters [] on http://0.0.0.0:")
    assert err.startswith("warning: ") and "--api-key" in err and len(err.splitlines()) == 1
    assert cli_serve._is_loopback("127.0.0.1") and cli_serve._is_loopback("::1")
    assert cli_serve._is_loopback("localhost") and not cli_serve._is_loopback("0.0.0.0")


# -- acceptance: the real server, the real model, the openai client ---------------------------

@pytest.fixture(scope="module")
def real_adapters(tmp_path_factory) -> dict[str, Path]:
    from deltatune.models import load_model
    root = tmp_path_factory.mktemp("real_adapters")
    dirs = {}
    for index, name in enumerate(("alpha", "beta")):
        model = load_model("smollm2-135m").model
        handle = deltatune.apply(model, config_class("lora").from_options(
            {"r": 8, "targets": ["q_proj", "v_proj"]}))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter_name, parameter in handle.named_trainable_parameters().items():
                if "lora_B" in parameter_name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        dirs[name] = root / name
        save_adapter(handle, dirs[name], base_model_name_or_path="smollm2-135m")
    return dirs


def _offline(prompt: str, adapter: Path | None, template: str | None, tokens: int) -> str:
    from deltatune.jobs.inference import GenerateRequest, generate_text
    return generate_text(GenerateRequest(prompt=prompt, model="smollm2-135m",
                                         adapter=None if adapter is None else str(adapter),
                                         template=template, max_new_tokens=tokens,
                                         temperature=0))


@pytest.mark.integration
def test_real_server_matches_deltatune_generate(real_adapters):
    from openai import OpenAI

    from deltatune.models import load_model
    loaded = load_model("smollm2-135m")
    bank = AdapterBank(loaded.model)
    bank.load("alpha", real_adapters["alpha"])
    engine = GenerationEngine(loaded.model, loaded.tokenizer, bank, max_batch_size=16,
                              batch_wait_ms=50)
    root = real_adapters["alpha"].parent
    state = ServerState(engine, bank, loaded.tokenizer, "smollm2-135m",
                        ServerLimits(api_key=KEY, adapter_dir=root))
    tokens = 12
    prompt, question = "The three primary colours are", "Name a fruit that is yellow."
    cases = [(kind, model) for kind in ("completion", "chat")
             for model in ("smollm2-135m", "alpha", "beta")]
    with serve_in_thread(build_app(state)) as url:
        client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m", "alpha"]
        loaded_beta = client.post("/adapters", cast_to=object,
                                  body={"name": "beta", "path": "beta"})
        assert loaded_beta["name"] == "beta"

        def ask(case):
            kind, model = case
            if kind == "completion":
                # `deltatune generate --template none` feeds the prompt and a newline
                return client.completions.create(model=model, prompt=prompt + "\n",
                                                  max_tokens=tokens, temperature=0) \
                    .choices[0].text
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}],
                max_tokens=tokens, temperature=0).choices[0].message.content

        batches_before = engine.stats["batches"]
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = dict(zip(cases, pool.map(ask, cases)))
        assert engine.stats["batches"] - batches_before < len(cases)  # requests were batched

        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(
                               model="beta", messages=[{"role": "user", "content": question}],
                               max_tokens=tokens, temperature=0, stream=True))
        assert streamed == answers[("chat", "beta")]
        sampled = [client.completions.create(model="alpha", prompt=prompt, max_tokens=tokens,
                                             temperature=0.9, seed=3).choices[0].text
                   for _ in range(2)]
        assert sampled[0] == sampled[1]
        first_word = answers[("completion", "alpha")].split()[0]
        stopped = client.completions.create(model="alpha", prompt=prompt + "\n",
                                            max_tokens=tokens, temperature=0, stop=[first_word])
        assert stopped.choices[0].finish_reason == "stop"
        assert first_word not in stopped.choices[0].text

        client.delete("/adapters/beta", cast_to=object)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m", "alpha"]
        with pytest.raises(Exception) as refused:
            client.completions.create(model="beta", prompt=prompt, max_tokens=2)
        assert getattr(refused.value, "status_code", None) == 404

    adapters = {"smollm2-135m": None, **real_adapters}
    for (kind, model), text in answers.items():
        expected = _offline(prompt if kind == "completion" else question, adapters[model],
                            "none" if kind == "completion" else None, tokens)
        assert text.strip() == expected, (kind, model)
    # the adapters matter
    assert len({(answers[("chat", m)], answers[("completion", m)]) for m in adapters}) == 3
