"""Plain language-model adaptation (continued pre-training): text records cut into blocks, loss on
every token, packed, evaluated by perplexity. Needs a training file."""
from __future__ import annotations

from deltatune.data import DataConfig, TextBlockEncoding
from deltatune.jobs.tasks.base import require_training_file
from deltatune.jobs.tasks.causal_lm import CausalLMTask


class TextTask(CausalLMTask):
    name = "text"
    encoding = TextBlockEncoding()

    def resolve_data(self, data: DataConfig) -> DataConfig:
        return require_training_file(self.name, data)

    def primary_metric(self, requested: str, examples: list[dict]) -> str:
        return "perplexity" if requested == "auto" else requested
