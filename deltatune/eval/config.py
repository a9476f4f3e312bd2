"""Evaluation settings: the `eval:` section of a run config (checked once at the CLI/YAML
boundary)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from deltatune.data.retain import RetainSet

METRICS = ("auto", "exact_match", "perplexity", "accuracy")


@dataclass
class EvalConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1)] = 32
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    # exact_match needs instruction data with references; perplexity works on any LM data;
    # auto lets the task choose.
    metric: Literal["auto", "exact_match", "perplexity", "accuracy"] = "auto"
    baseline: bool = True
    # Forgetting measured at every evaluation (deltatune/eval/forgetting.py): each retain set's
    # perplexity (language models) or accuracy (classifiers), and the probe: the KL divergence
    # from the base model on continuations it generated itself. "auto": the probe runs for
    # language models; "on"/"off" force it.
    retain: list[RetainSet] = field(default_factory=list)
    probe: Literal["auto", "on", "off"] = "auto"
    probe_prompts: Annotated[int, Field(ge=1)] = 16
    probe_new_tokens: Annotated[int, Field(ge=1)] = 48
