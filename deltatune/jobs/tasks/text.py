"""Plain language-model adaptation (continued pre-training): text records cut into blocks, loss on
every token, packed, evaluated by perplexity. Needs a training file."""
from __future__ import annotations

from deltatune.data import DataConfig, TextBlockEncoding
from deltatune.errors import ConfigError
from deltatune.jobs.tasks.causal_lm import CausalLMTask


class TextTask(CausalLMTask):
    name = "text"
    encoding = TextBlockEncoding()

    def resolve_data(self, data: DataConfig) -> DataConfig:
        if not data.train:
            raise ConfigError(f"task '{self.name}' needs training data: pass --train PATH")
        return data

    def primary_metric(self, requested: str, examples: list[dict]) -> str:
        return "perplexity" if requested == "auto" else requested
