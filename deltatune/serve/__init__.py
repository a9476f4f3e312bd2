"""Adapters in production: many adapters on one base with per-row routing (bank.py), batched
generation with a KV cache and batching policies (engine.py), the OpenAI-compatible HTTP server
(server.py, protocol.py) and adapter arithmetic — linear, TIES, DARE, negation (arithmetic.py).
Import the submodules; this package imports nothing so `deltatune serve` starts fast."""
