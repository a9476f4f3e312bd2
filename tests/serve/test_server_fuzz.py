"""A seeded fuzz of `deltatune serve`: over a thousand malformed requests against the app on real
uvicorn (the real engine, a tiny random Llama with SmolLM2's tokenizer). Every request is built
to be invalid — bad or truncated JSON, JSON that is not an object, a wrong type or an
out-of-range value for each field, missing fields, unknown models and adapters, `n` > 1,
oversized bodies with a Content-Length or chunked, unicode and byte garbage, wrong methods and
paths, a missing or wrong API key, adapter paths outside the allowed folder — and must get a 4xx
with OpenAI's error JSON and a message. Afterwards the server still answers a valid request."""
from __future__ import annotations

import json
import random
import string
from collections import Counter
from pathlib import Path

import httpx
import pytest

from deltatune.serve.server import build_app
from tests.serve.conftest import load_tokenizer
from tests.serve.test_server import BASE, KEY, make_adapters, make_state, serve_in_thread

BODY_LIMIT = 8_000
TOKENS_LIMIT = 32
AUTH = {"Authorization": f"Bearer {KEY}"}

# Values that are wrong for each field whatever else the request holds (strict types, ranges).
WRONG = {
    "model": [5, 1.5, True, None, [], {}, ["tiny"]],
    "prompt": [5, 1.5, True, None, [], {}, ["a", "b"], [1, 2, 3], ""],
    "messages": [5, "hello", None, {}, [], [5], ["hi"], [{"role": "robot", "content": "x"}],
                 [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": None}], [{"role": 1, "content": "x"}]],
    "max_tokens": [0, -1, -(10 ** 12), TOKENS_LIMIT + 1, 10 ** 30, 1.5, 4.0, "8", True, [],
                   {}],
    "temperature": [-0.01, 2.01, 1e308, -5, "1", True, [], {}, None],
    "top_p": [-0.5, 1.01, 7, "0.9", False, [], {}, None],
    "stop": [5, True, {}, [1], [None], ["a", "b", "c", "d", "e"], [""], [[]]],
    "seed": ["1", 1.5, True, [], {}, 2 ** 70, -(2 ** 70)],
    "stream": ["true", 1, 0, None, [], {}],
    "n": [2, 0, -1, 5, "1", 1.0, True, None],
}
COMMON = ["model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n"]


def _valid_completion(rng: random.Random) -> dict:
    return {"model": rng.choice([BASE, "a", "b"]), "prompt": "Hello there", "max_tokens": 4,
            "temperature": 0}


def _valid_chat(rng: random.Random) -> dict:
    return {"model": rng.choice([BASE, "a", "b"]),
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _garbage_text(rng: random.Random, size: int) -> str:
    alphabet = string.printable + "{}[]\":,\u00e9\u4e2d\U0001f600\u0000\ufffd\u202e"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


class Fuzzer:
    """Makes (category, method, path, kwargs for httpx) tuples, each one invalid."""

    def __init__(self, rng: random.Random, adapter_root: Path, outside: Path):
        self.rng = rng
        self.adapter_root = adapter_root
        self.outside = outside

    def endpoint(self) -> tuple[str, dict]:
        if self.rng.random() < 0.5:
            return "/v1/completions", _valid_completion(self.rng)
        return "/v1/chat/completions", _valid_chat(self.rng)

    def post(self, path: str, body: object, headers: dict | None = None) -> tuple:
        return "POST", path, {"content": json.dumps(body),
                              "headers": {"content-type": "application/json", **AUTH,
                                          **(headers or {})}}

    def raw(self, path: str, content: bytes | str) -> tuple:
        return "POST", path, {"content": content,
                              "headers": {"content-type": "application/json", **AUTH}}

    # -- the categories ----------------------------------------------------------------------
    def wrong_type(self) -> tuple:
        path, body = self.endpoint()
        own = "prompt" if "prompt" in body else "messages"
        field = self.rng.choice(COMMON + [own])
        body[field] = self.rng.choice(WRONG[field])
        return self.post(path, body)

    def missing_field(self) -> tuple:
        path, body = self.endpoint()
        del body[self.rng.choice(["model", "prompt" if "prompt" in body else "messages"])]
        return self.post(path, body)

    def bad_json(self) -> tuple:
        path, _ = self.endpoint()
        text = _garbage_text(self.rng, self.rng.randint(1, 200))
        while not _not_json(text) or not text.strip():
            text = _garbage_text(self.rng, self.rng.randint(1, 200))
        return self.raw(path, text)

    def truncated_json(self) -> tuple:
        path, body = self.endpoint()
        text = json.dumps(body)
        cut = self.rng.randint(0, len(text) - 1)
        while not _not_json(text[:cut]):
            cut = self.rng.randint(0, len(text) - 1)
        return self.raw(path, text[:cut])

    def not_an_object(self) -> tuple:
        path, _ = self.endpoint()
        return self.post(path, self.rng.choice([[], [1, 2], 5, -1.5, "text", None, True,
                                                [{"model": BASE}]]))

    def byte_garbage(self) -> tuple:
        path, _ = self.endpoint()
        data = bytes(self.rng.randrange(128, 256) for _ in range(self.rng.randint(1, 100)))
        return self.raw(path, data)

    def unknown_model(self) -> tuple:
        path, body = self.endpoint()
        body["model"] = "zz-" + _garbage_text(self.rng, self.rng.randint(0, 30))
        return self.post(path, body)

    def unsupported(self) -> tuple:
        path, body = self.endpoint()
        body["n"] = self.rng.randint(2, 10)
        return self.post(path, body)

    def too_long_prompt(self) -> tuple:
        path, body = self.endpoint()
        text = "word " * self.rng.randint(60, 600)
        if "prompt" in body:
            body["prompt"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        return self.post(path, body)

    def oversized(self) -> tuple:
        path, body = self.endpoint()
        body["pad"] = "x" * self.rng.randint(BODY_LIMIT, 4 * BODY_LIMIT)
        if self.rng.random() < 0.5:
            return self.post(path, body)          # with a Content-Length
        data = json.dumps(body).encode()
        step = self.rng.randint(100, 3000)

        def chunks():                              # chunked: no Content-Length at all
            for start in range(0, len(data), step):
                yield data[start:start + step]
        return "POST", path, {"content": chunks(),
                              "headers": {"content-type": "application/json", **AUTH}}

    def bad_key(self) -> tuple:
        method, path, kwargs = self.post(*self.endpoint())
        headers = dict(kwargs["headers"])
        choice = self.rng.random()
        if choice < 0.3:
            del headers["Authorization"]
        elif choice < 0.6:
            headers["Authorization"] = "Bearer " + KEY[:-1] + "x"
        elif choice < 0.8:
            headers["Authorization"] = KEY            # no "Bearer "
        else:
            # any visible ASCII (what a header may carry), never the key itself
            headers["Authorization"] = "Bearer " + "".join(
                self.rng.choice(string.ascii_letters + string.punctuation) for _ in range(12))
        if self.rng.random() < 0.3:
            return self.rng.choice(["GET", "DELETE"]), self.rng.choice(
                ["/v1/models", "/v1/adapters", "/v1/adapters/a"]), {"headers": headers}
        return method, path, {**kwargs, "headers": headers}

    def wrong_route(self) -> tuple:
        if self.rng.random() < 0.5:
            method, path = self.rng.choice([
                ("GET", "/v1/completions"), ("PUT", "/v1/completions"),
                ("GET", "/v1/chat/completions"), ("PATCH", "/v1/chat/completions"),
                ("POST", "/v1/models"), ("DELETE", "/v1/models"), ("PUT", "/v1/adapters"),
                ("POST", "/v1/adapters/a"), ("GET", "/v1/adapters/a")])
        else:
            method = self.rng.choice(["GET", "POST", "PUT", "DELETE"])
            path = self.rng.choice(["/v1/", "/v1/engines", "/v2/completions", "/", "/admin",
                                    "/v1/embeddings", "/v1/completion", "/v1/chat"]) \
                + self.rng.choice(["", "x", "/zz" + str(self.rng.randint(0, 99))])
            if path == "/v1/":
                path = "/v1/zz"
        return method, path, {"headers": AUTH}

    def unknown_adapter(self) -> tuple:
        name = "zz" + "".join(self.rng.choice(string.ascii_letters) for _ in range(8))
        return "DELETE", f"/v1/adapters/{name}", {"headers": AUTH}

    def bad_adapter_load(self) -> tuple:
        rng = self.rng
        bodies = [
            {"name": "new" + str(rng.randint(0, 999)), "path": str(self.outside)},
            {"name": "new", "path": "../" + self.outside.name},
            {"name": "new", "path": "a/../../" + self.outside.name},
            {"name": "new", "path": "/etc"},
            {"name": "new", "path": "link"},
            {"name": "new", "path": "missing" + str(rng.randint(0, 99))},
            {"name": "new", "path": "a\x00"},
            {"name": rng.choice(["", "has space", "x" * 65, "a/b", "ok\n", BASE, "a"]),
             "path": "a"},
            {"name": 5, "path": "a"}, {"name": "new", "path": 5}, {"name": "new"},
            {"path": "a"}, [], "a",
        ]
        return self.post("/v1/adapters", rng.choice(bodies))

    CATEGORIES = ["wrong_type", "wrong_type", "wrong_type", "missing_field", "bad_json",
                  "truncated_json", "not_an_object", "byte_garbage", "unknown_model",
                  "unsupported", "too_long_prompt", "oversized", "bad_key", "wrong_route",
                  "unknown_adapter", "bad_adapter_load"]

    def make(self) -> tuple[str, tuple]:
        category = self.rng.choice(self.CATEGORIES)
        return category, getattr(self, category)()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokenizer = load_tokenizer()
    root = tmp_path_factory.mktemp("allowed")
    adapters = make_adapters(root)
    outside = make_adapters(tmp_path_factory.mktemp("outside"), ("c",))["c"]
    (root / "link").symlink_to(outside, target_is_directory=True)
    state = make_state(tokenizer, adapters, api_key=KEY, adapter_dir=root,
                       max_tokens_limit=TOKENS_LIMIT, max_prompt_tokens=48,
                       max_body_bytes=BODY_LIMIT)
    with serve_in_thread(build_app(state)) as url:
        yield url.removesuffix("/v1"), root, outside, state


def test_fuzz_malformed_requests_get_openai_errors(server):
    base_url, root, outside, state = server
    fuzzer = Fuzzer(random.Random(1234), root, outside)
    seen: Counter = Counter()
    statuses: Counter = Counter()
    failures = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for index in range(1200):
            category, (method, path, kwargs) = fuzzer.make()
            seen[category] += 1
            response = client.request(method, path, **kwargs)
            statuses[response.status_code] += 1
            problem = _check(response)
            if problem:
                failures.append((index, category, method, path, response.status_code,
                                 response.text[:300], problem))
        assert not failures, failures[:10]
        assert len(seen) == len(set(Fuzzer.CATEGORIES))
        assert {400, 401, 403, 404, 405, 413} <= set(statuses), statuses
        # still alive, still right
        models = client.get("/v1/models", headers=AUTH)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == [BASE, "a", "b"]
        ok = client.post("/v1/completions", headers=AUTH, json={
            "model": "a", "prompt": "Hello there", "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
    assert state.engine._thread is not None and state.engine._thread.is_alive()


def _check(response: httpx.Response) -> str | None:
    if not 400 <= response.status_code < 500:
        return "not a 4xx"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "not OpenAI's error JSON"
    if set(error) != {"message", "type", "param", "code"}:
        return "wrong error keys"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return "empty message"
    if error["type"] not in ("invalid_request_error", "authentication_error",
                             "not_found_error", "permission_error"):
        return "unknown error type"
    return None
