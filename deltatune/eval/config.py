"""Evaluation settings: the `eval:` section of a run config (checked once at the CLI/YAML
boundary)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

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
