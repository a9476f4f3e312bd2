"""The `deltatune serve` subcommand: its flags and --help, then the model, the adapter bank, the
generation engine and the OpenAI-compatible app (deltatune/serve/) run under uvicorn.
`deltatune/cli.py` registers it; user mistakes raise DeltatuneError subclasses, which `cli.main`
prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from deltatune.errors import ConfigError

_DESCRIPTION = """\
Serve a base model and any number of adapters over an OpenAI-compatible HTTP API:
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true),
and GET/POST /v1/adapters, DELETE /v1/adapters/NAME to list, load and unload adapters while
the server runs.

The request's "model" field picks the adapter (the base model's id, e.g. smollm2-135m, picks
none), as vLLM does. Requests that arrive together are decoded in one batch with a KV cache,
whatever adapters they use: each row runs its own adapter (LoRA, rsLoRA, DoRA, QLoRA, IA3) on
top of one shared base (--policy mixed). --policy swap and swap-grouped are the
single-adapter-server baselines: one adapter per batch, merged into the base first.

Safety: binds to 127.0.0.1 unless --host says otherwise; --api-key (or DELTATUNE_API_KEY)
requires "Authorization: Bearer KEY" on every /v1 call; bodies, max_tokens and prompt length are
capped; adapters load at run time only from inside --adapter-dir. Every bad request gets a 4xx
JSON error in OpenAI's shape and the server keeps serving."""

_EPILOG = """\
examples:
  deltatune serve --model smollm2-135m --adapter dates=runs/dates/adapter \\
      --adapter numbers=runs/numbers/adapter --adapter-dir runs

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "dates", "messages": [{"role": "user", "content": "March 5, 2019"}],
           "max_tokens": 16, "temperature": 0}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', \\
      api_key='none'); print(c.completions.create(model='numbers', prompt='12 is', \\
      max_tokens=8, temperature=0).choices[0].text)"

  curl -X POST http://127.0.0.1:8000/v1/adapters -H 'Content-Type: application/json' \\
      -d '{"name": "identity", "path": "identity/adapter"}'    # inside --adapter-dir"""


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, many adapters, "
                       "mixed-adapter batches", description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: a known name, a local folder or a hub id "
                   "(default smollm2-135m)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", default=[],
                   help="an adapter folder (or a run directory) served as model NAME; "
                   "repeatable")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="allow POST /v1/adapters to load adapters from inside DIR (off without)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $DELTATUNE_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="most requests decoded together (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long to wait for more requests before a batch starts (default 5)")
    p.add_argument("--policy", choices=["mixed", "swap", "swap-grouped"], default="mixed",
                   help="mixed: any adapters in one batch; swap: the oldest request's adapter "
                   "and the requests right behind it with the same one, merged first (the "
                   "single-adapter-server baseline); swap-grouped: like swap but every waiting "
                   "request of that adapter joins the batch")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="the largest max_tokens a request may ask (default 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096,
                   help="the longest prompt in tokens (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="the largest request body (default 1000000)")
    p.add_argument("--quantize", metavar="FORMAT",
                   help="freeze the base's linear layers in a number format (e.g. nf4 for "
                   "QLoRA adapters)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code the model folder ships (auto_map); only for code you "
                   "have read")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    _check_numbers(args)
    adapters = [_adapter_flag(value) for value in args.adapter]
    adapter_dir = _adapter_dir(args.adapter_dir)
    import uvicorn

    from deltatune.models import load_model
    from deltatune.serve.bank import AdapterBank
    from deltatune.serve.engine import GenerationEngine
    from deltatune.serve.server import ServerLimits, ServerState, build_app

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code,
                        quantize=args.quantize)
    bank = AdapterBank(loaded.model)
    for name, folder in adapters:
        bank.load(name, folder)
    engine = GenerationEngine(loaded.model, loaded.tokenizer, bank,
                              max_batch_size=args.max_batch_size,
                              batch_wait_ms=args.batch_wait_ms, policy=args.policy)
    limits = ServerLimits(api_key=args.api_key or None, adapter_dir=adapter_dir,
                          max_tokens_limit=args.max_tokens_limit,
                          max_body_bytes=args.max_body_bytes,
                          max_prompt_tokens=args.max_prompt_tokens)
    base_id = _base_id(args.model)
    app = build_app(ServerState(engine, bank, loaded.tokenizer, base_id, limits))
    sock = _bind(args.host, args.port)
    if not _is_loopback(args.host) and limits.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"serving {base_id} + adapters {bank.names()} on http://{args.host}:{port}/v1 "
          f"(policy {args.policy})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--max-batch-size", args.max_batch_size),
                        ("--max-tokens-limit", args.max_tokens_limit),
                        ("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")


def _adapter_flag(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter expects NAME=PATH, got {value!r}")
    folder = Path(path)
    if (folder / "adapter").is_dir() and (folder / "config.yaml").is_file():
        folder = folder / "adapter"  # a run directory
    return name, folder


def _adapter_dir(value: str | None) -> Path | None:
    if value is None:
        return None
    folder = Path(value)
    if not folder.is_dir():
        raise ConfigError(f"--adapter-dir {value!r} is not a folder")
    return folder.resolve()


def _base_id(model: str) -> str:
    path = Path(model)
    return path.name if path.exists() else model


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}); pick another "
                          "--port (0 picks a free one)") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
