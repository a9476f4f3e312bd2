"""Prefix tuning (Li & Liang, 2021): p trainable key/value vectors prepended to the keys and
values of every attention layer, the whole model frozen; optionally produced during training by
a reparameterising MLP (`prefix_projection`), which is folded away when saving.

Mechanism (PEFT's): the backbone pre-hook (see `virtual_tokens`) pre-fills a transformers
`DynamicCache` with the prefixes of every layer before the first call of a sequence, so each
attention layer concatenates them to its keys/values through its ordinary cache path; the
attention mask gets p leading ones and the real tokens sit at positions p.. (as in PEFT). The
prefix keys are stored as given (no rotary embedding), like PEFT's. For grouped-query attention
the prefixes have `num_key_value_heads` heads (`token_dim` = kv heads x head dim), as in PEFT.
Works for every architecture whose attention layers read `past_key_values` — decoders such as
Llama, and BERT-style encoders, whose self-attention in transformers 5 also uses a passed cache.
Saved as PEFT's PREFIX_TUNING adapter: `prompt_embeddings` of shape
(p, num_layers * 2 * token_dim) — the MLP's output when `prefix_projection` is on.

Initialisation: PEFT's random N(0, 1) (the default), zeros, or `init_weights="text"` — the keys
and values the frozen model itself computes for a short text (Li & Liang's "activations of real
words"), so the untrained model behaves exactly as if that text preceded every input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.errors import ConfigError
from deltatune.methods.virtual_tokens import (ModelShape, VirtualTokenConfig, VirtualTokenEncoder,
                                              VirtualTokenHandle, VirtualTokenHooks,
                                              embedding_device_and_dtype, extend_attention_mask,
                                              find_backbone, folded_embedding, input_embeddings,
                                              install, model_shape, repeat_to_length)


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    """`prefix_projection`: train the prefixes through an MLP (embedding (p, token_dim) ->
    Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(.., num_layers*2*token_dim));
    `encoder_hidden_size` defaults to `token_dim`. `init_weights`: unset = PEFT's random N(0, 1)
    embedding init, "zero" = PEFT's zero init, "text" = the model's own keys/values for
    `init_text` (tokenized by `prepare(tokenizer)`, or pass `init_token_ids`; repeated or
    truncated to p tokens)."""

    method_name: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    init_text: str | None = None
    init_token_ids: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero", "text"):
            raise ConfigError(f"prefix: init_weights must be unset, 'zero' or 'text', got "
                              f"'{self.init_weights}'")
        if self.init_weights == "text":
            if not self.init_text and not self.init_token_ids:
                raise ConfigError("prefix: init_weights='text' needs init_text (e.g. "
                                  "init_text='You are a helpful assistant.')")
            if self.prefix_projection:
                raise ConfigError("prefix: init_weights='text' sets the prefixes directly, but "
                                  "with prefix_projection they are the MLP's output; turn one off")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError("prefix: encoder_hidden_size must be >= 1")

    def prepare(self, tokenizer: Any) -> None:
        if self.init_weights != "text" or self.init_token_ids:
            return
        self.validate()
        # No [CLS]/BOS: the prefix is a text *before* the input, which brings its own.
        self.init_token_ids = list(tokenizer(self.init_text, add_special_tokens=False)["input_ids"])

    def model_dims(self, shape: ModelShape) -> dict[str, int]:
        return {"token_dim": shape.num_key_value_heads * shape.head_dim,
                "num_layers": shape.num_layers,
                "num_attention_heads": shape.num_key_value_heads}

    def method_defaults(self, dims: dict[str, int]) -> dict[str, Any]:
        return {"encoder_hidden_size": self.encoder_hidden_size or dims["token_dim"]}

    def peft_fields(self) -> dict[str, Any]:
        # PEFT knows no text init; the trained prefixes are in the weights file, so none is needed.
        init_weights = None if self.init_weights == "text" else self.init_weights
        return {"prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size,
                "init_weights": init_weights}


class PrefixEncoder(VirtualTokenEncoder):
    """PEFT's PrefixEncoder: `forward()` gives (p, num_layers * 2 * token_dim), either the
    `embedding` itself or `transform(embedding)`. After `fold` only `embedding` remains."""

    def __init__(self, config: PrefixTuningConfig, device: torch.device, dtype: torch.dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        p, dim = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            self.embedding = nn.Embedding(p, dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size, **factory), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width, **factory))
            zero_last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(p, width, **factory)
            zero_last = self.embedding
        if config.init_weights == "zero":
            for parameter in zero_last.parameters():
                nn.init.zeros_(parameter)
        self._width = width

    def forward(self) -> torch.Tensor:
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def saved_shape(self) -> tuple[int, int]:
        return self.embedding.weight.shape[0], self._width

    def fold(self, tensor: torch.Tensor) -> None:
        self.embedding = folded_embedding(tensor, self.embedding.weight)
        self.transform = None


class PrefixHooks(VirtualTokenHooks):
    """Pre-fills the KV cache with every layer's prefix before the first call of a sequence."""

    required_arguments = ("past_key_values", "attention_mask")

    def __init__(self, owner: nn.Module, backbone: nn.Module, num_virtual_tokens: int,
                 method_name: str, shape: ModelShape):
        super().__init__(owner, backbone, num_virtual_tokens, method_name)
        self.shape = shape

    def inject(self, call: dict[str, Any]) -> None:
        if self.backbone.training and any(getattr(m, "gradient_checkpointing", False) is True
                                          for m in self.backbone.modules()):
            raise ConfigError("prefix: gradient checkpointing recomputes the layers and would add "
                              "the prefixes to the cache twice; turn gradient checkpointing off "
                              "(or use prompt tuning)")
        batch, length, device = self.batch_and_length(call)
        cache = call.get("past_key_values")
        if cache is None:
            cache = DynamicCache(config=self.backbone.config)
            call["past_key_values"] = cache
        keys_and_values = self.layer_prefixes(device)
        for layer_idx, (keys, values) in enumerate(keys_and_values):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1),
                         layer_idx)
        mask = call.get("attention_mask")
        if mask is None:
            # An encoder sizes its mask from the mask itself, not the cache: make it explicit.
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        call["attention_mask"] = extend_attention_mask(mask, self.num_virtual_tokens)
        if call.get("position_ids") is not None:
            call["position_ids"] = call["position_ids"] + self.num_virtual_tokens

    def layer_prefixes(self, device: torch.device) -> torch.Tensor:
        """(num_layers, 2, 1, kv_heads, p, head_dim): per layer the key and the value prefix,
        split from the flat width in PEFT's order (layer, key/value, head, head_dim)."""
        s, p = self.shape, self.num_virtual_tokens
        dtype = input_embeddings(self.backbone).weight.dtype
        flat = self.virtual_tokens().to(device=device, dtype=dtype)
        prefixes = flat.reshape(p, s.num_layers, 2, s.num_key_value_heads, s.head_dim)
        return prefixes.permute(1, 2, 3, 0, 4).unsqueeze(2)


def text_prefixes(model: nn.Module, config: PrefixTuningConfig) -> torch.Tensor:
    """(p, num_layers * 2 * token_dim): the keys and values the frozen model computes for the
    init text, laid out as `layer_prefixes` reads them. The keys carry the rotary/absolute
    positions 0..p-1, where the prefix sits, so the model sees exactly that text before its input."""
    if not config.init_token_ids:
        raise ConfigError("prefix: init_weights='text' needs the text tokenized: call "
                          "config.prepare(tokenizer) before apply, or pass init_token_ids")
    p = config.num_virtual_tokens
    ids = repeat_to_length(config.init_token_ids, p)
    backbone = find_backbone(model)
    device = input_embeddings(backbone).weight.device
    cache = DynamicCache(config=backbone.config)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        backbone(input_ids=torch.tensor([ids], device=device), past_key_values=cache,
                 use_cache=True)
    backbone.train(was_training)
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    # (L, 2, heads, p, head_dim) -> (p, L, 2, heads, head_dim), the flat order of the saved file.
    stacked = torch.stack(per_layer).permute(3, 0, 1, 2, 4)
    return stacked.reshape(p, -1)


def apply_prefix(model: nn.Module, config: PrefixTuningConfig) -> VirtualTokenHandle:
    """Freezes `model` and adds trainable key/value prefixes to every attention layer."""
    config = config.resolve(model)
    device, dtype = embedding_device_and_dtype(model)
    encoder = PrefixEncoder(config, device, dtype)
    if config.init_weights == "text":
        with torch.no_grad():
            encoder.embedding.weight.copy_(text_prefixes(model, config))
    return install(model, config, encoder, PrefixHooks,
                   shape=model_shape(model, config.method_name))
