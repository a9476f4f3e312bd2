"""Causal-LM instruction tuning: instruction/chat records with the loss on the responses only,
packed rows, the fused head + loss, evaluated by exact match of greedy generations (when the
data has references) and perplexity. With no data it trains on the built-in `dates` task."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from deltatune.data import DataConfig, InstructionEncoding
from deltatune.errors import ConfigError
from deltatune.eval.config import EvalConfig
from deltatune.eval.evaluate import evaluate_exact_match, evaluate_perplexity
from deltatune.jobs.tasks.base import Evaluate, Task
from deltatune.train.objectives import CausalLMObjective, LossTerm, Objective

DEFAULT_BUILTIN = "dates"


class CausalLMTask(Task):
    name = "causal-lm"
    model_kind = "causal-lm"
    encoding = InstructionEncoding()
    packs = True
    fuses_loss = True

    def resolve_data(self, data: DataConfig) -> DataConfig:
        if data.train or data.builtin:
            return data
        return dataclasses.replace(data, builtin=DEFAULT_BUILTIN)

    def objective(self, terms: Sequence[LossTerm] = ()) -> Objective:
        return CausalLMObjective(terms)

    def primary_metric(self, requested: str, examples: list[dict]) -> str:
        if requested != "auto":
            return requested
        has_references = bool(examples) and all("reference" in e for e in examples)
        return "exact_match" if has_references else "perplexity"

    def evaluator(self, loaded: Any, examples: list[dict], info: dict[str, Any],
                  config: EvalConfig, progress: bool) -> Evaluate:
        model, tokenizer = loaded.model, loaded.tokenizer
        pad = tokenizer.pad_token_id
        metric = self.primary_metric(config.metric, examples)
        if metric == "accuracy":
            raise ConfigError(f"metric accuracy is for classification; task {self.name} reports "
                              "exact_match or perplexity")
        if metric == "exact_match":
            if not all("reference" in e for e in examples):
                raise ConfigError("metric exact_match needs instruction data with responses; "
                                  "use --metric perplexity for plain text")

            def exact_match_and_loss() -> dict[str, Any]:
                scores = evaluate_exact_match(model, tokenizer, examples, config.max_new_tokens,
                                              config.batch_size, progress)
                scores.update(evaluate_perplexity(model, examples, pad, config.batch_size))
                return scores
            return exact_match_and_loss
        return lambda: evaluate_perplexity(model, examples, pad, config.batch_size, progress)
