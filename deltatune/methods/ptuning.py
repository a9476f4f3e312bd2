"""P-tuning (Liu et al., 2021): p virtual token embeddings produced by a small trainable prompt
encoder — an MLP or a bidirectional LSTM followed by an MLP — and prepended to the input
embeddings of every sequence, the whole model frozen.

The encoder mirrors PEFT's `PromptEncoder` module by module (`embedding`, `mlp_head`,
`lstm_head`), lives at `model.prompt_encoder`, and is fed through the same backbone hooks as
prompt tuning (see `virtual_tokens`). What is saved is the encoder's output — p embeddings, key
`prompt_embeddings` — as PEFT saves it; loading such a file (ours or PEFT's) puts the encoder in
its folded form, the output used directly, as PEFT's inference mode does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.virtual_tokens import (InputTokenHooks, VirtualTokenConfig,
                                              VirtualTokenEncoder, VirtualTokenHandle,
                                              embedding_device_and_dtype, folded_embedding,
                                              install)

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # PEFT's default encoder_num_layers; its MLP ignores other values


@dataclass
class PTuningConfig(VirtualTokenConfig):
    """`encoder_reparameterization_type`: "MLP" (three Linear layers with ReLU, as PEFT) or
    "LSTM" (bidirectional, `encoder_num_layers` layers, `encoder_dropout` between them, then a
    two-layer MLP). `encoder_hidden_size` defaults to the model's hidden size."""

    method_name: ClassVar[str] = "ptuning"
    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type.upper() not in ENCODER_TYPES:
            raise ConfigError(f"ptuning: encoder_reparameterization_type "
                              f"'{self.encoder_reparameterization_type}' is not one of "
                              f"{list(ENCODER_TYPES)}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError("ptuning: encoder_hidden_size must be >= 1")
        if self.encoder_num_layers < 1 or not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError("ptuning: encoder_num_layers must be >= 1 and encoder_dropout in "
                              f"[0, 1); got {self.encoder_num_layers}, {self.encoder_dropout}")

    def method_defaults(self, dims: dict[str, int]) -> dict[str, Any]:
        return {"encoder_reparameterization_type": self.encoder_reparameterization_type.upper(),
                "encoder_hidden_size": self.encoder_hidden_size or dims["token_dim"]}

    def peft_fields(self) -> dict[str, Any]:
        return {"encoder_reparameterization_type": self.encoder_reparameterization_type,
                "encoder_hidden_size": self.encoder_hidden_size,
                "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout}


class PromptEncoder(VirtualTokenEncoder):
    """PEFT's PromptEncoder: `embedding` (p, token_dim) -> `lstm_head`? -> `mlp_head`. After
    `fold`, `embedding.weight` holds the output and the heads are gone."""

    def __init__(self, config: PTuningConfig, device: torch.device, dtype: torch.dtype):
        super().__init__()
        p, dim, hidden = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(p, dim, **factory)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True,
                                     batch_first=True, **factory)
            self.mlp_head: nn.Sequential | None = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                nn.Linear(2 * hidden, dim, **factory))
        else:
            if config.encoder_num_layers != MLP_LAYERS:
                warnings.warn(f"ptuning: encoder_num_layers={config.encoder_num_layers} is ignored "
                              "by the MLP encoder (always three Linear layers, as in PEFT)")
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, **factory), nn.ReLU(),
                nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                nn.Linear(hidden, dim, **factory))

    def forward(self) -> torch.Tensor:
        embeds = self.embedding.weight
        if self.mlp_head is None:
            return embeds
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds.unsqueeze(0))[0][0]
        return self.mlp_head(embeds)

    def saved_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)

    def fold(self, tensor: torch.Tensor) -> None:
        self.embedding = folded_embedding(tensor, self.embedding.weight)
        self.lstm_head = None
        self.mlp_head = None


def apply_ptuning(model: nn.Module, config: PTuningConfig) -> VirtualTokenHandle:
    """Freezes `model` and prepends the prompt encoder's virtual tokens to every input."""
    config = config.resolve(model)
    device, dtype = embedding_device_and_dtype(model)
    encoder = PromptEncoder(config, device, dtype)
    return install(model, config, encoder, InputTokenHooks)
