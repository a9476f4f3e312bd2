"""Prompt tuning (Lester et al., 2021): p trainable "soft prompt" embeddings prepended to the
input embeddings of every sequence, the whole model frozen.

The soft prompt is an `nn.Embedding(p, hidden_size)` at `model.prompt_encoder`; hooks on the
backbone (see `virtual_tokens`) prepend it, so the training loop, classification and generation
all work unchanged. Initialised at random (as PEFT: N(0, 1)), from the embeddings of a text
(`init="text"`, tokenized by `prepare(tokenizer)`, repeated or truncated to p tokens as PEFT
does) or of random vocabulary tokens. Files are PEFT's PROMPT_TUNING adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.virtual_tokens import (InputTokenHooks, VirtualTokenConfig,
                                              VirtualTokenEncoder, VirtualTokenHandle,
                                              embedding_device_and_dtype, find_backbone,
                                              input_embeddings, install, repeat_to_length)

INIT_CHOICES = ("random", "text", "sample_vocab")


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """`init`: "random", "text" (embeddings of `init_text`) or "sample_vocab" (embeddings of
    random vocabulary tokens). For "text", call `prepare(tokenizer)` before `apply`, or pass
    `init_token_ids` yourself."""

    method_name: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    init: str = "random"
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"prompt: init '{self.init}' is not one of {list(INIT_CHOICES)}")
        if self.init == "text" and not self.init_text and not self.init_token_ids:
            raise ConfigError("prompt: init='text' needs init_text (e.g. init_text='Classify the "
                              "sentiment of this review:')")

    def prepare(self, tokenizer: Any) -> None:
        if self.init != "text" or self.init_token_ids:
            return
        self.validate()
        self.init_token_ids = list(tokenizer(self.init_text)["input_ids"])
        self.tokenizer_name_or_path = (self.tokenizer_name_or_path
                                       or getattr(tokenizer, "name_or_path", None) or None)

    def peft_fields(self) -> dict[str, Any]:
        init = self.init.upper()
        # PEFT refuses TEXT without a tokenizer to reload; the trained prompt is in the weights file
        # anyway, so RANDOM is written then.
        if init == "TEXT" and not self.tokenizer_name_or_path:
            init = "RANDOM"
        return {"prompt_tuning_init": init,
                "prompt_tuning_init_text": self.init_text if init == "TEXT" else None,
                "tokenizer_name_or_path": self.tokenizer_name_or_path if init == "TEXT" else None,
                "tokenizer_kwargs": None}

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "PromptTuningConfig":
        loaded = super().from_adapter_config(config)
        # The saved prompt replaces the initial one, so loading needs no tokenizer.
        loaded.init = "random"
        loaded.init_text = config.get("prompt_tuning_init_text")
        return loaded


class PromptEmbedding(VirtualTokenEncoder):
    """The soft prompt: `embedding.weight` (p, hidden_size) is both the trainable parameter and
    the saved `prompt_embeddings`."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=dtype)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def saved_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)

    def fold(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(tensor)


def initial_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int] | None:
    """Token ids whose embeddings start the prompt, repeated/truncated to p (PEFT's rule)."""
    p = config.num_virtual_tokens
    if config.init == "sample_vocab":
        return torch.randint(0, vocab_size, (p,)).tolist()
    if config.init != "text":
        return None
    if not config.init_token_ids:
        raise ConfigError("prompt: init='text' needs the text tokenized: call "
                          "config.prepare(tokenizer) before apply, or pass init_token_ids")
    return repeat_to_length(config.init_token_ids, p)


def apply_prompt(model: nn.Module, config: PromptTuningConfig) -> VirtualTokenHandle:
    """Freezes `model` and prepends a trainable soft prompt to every input; see the module doc."""
    config = config.resolve(model)
    device, dtype = embedding_device_and_dtype(model)
    encoder = PromptEmbedding(config.num_virtual_tokens, config.token_dim, device, dtype)
    word_embeddings = input_embeddings(find_backbone(model))
    token_ids = initial_token_ids(config, word_embeddings.weight.shape[0])
    if token_ids is not None:
        with torch.no_grad():
            ids = torch.tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            encoder.embedding.weight.copy_(word_embeddings(ids).float())
    return install(model, config, encoder, InputTokenHooks)
