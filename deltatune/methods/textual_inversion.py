"""Textual inversion: teach a frozen model new words. `prepare(tokenizer)` adds placeholder tokens
(e.g. "<my-style>") to the tokenizer; `apply` wraps the input embedding so those ids look up their
own rows, held in a separate trainable parameter `new_embeddings`, and — when the output head is
tied to the embeddings — extends the head with the same rows, so the model can also predict the
new tokens. Every original row and every other weight stays frozen and untouched (weight decay
included, since the optimizer never sees them). The adapter saves only the new rows plus the
tokenizer; loading it on a fresh base model needs no resize, which is what PEFT issue #1457 trips
over. `merge` folds the rows into a plain, larger nn.Embedding.

`handle.disabled()` gives the base model exactly: the wrappers run their base layers alone (the
base embedding rows — also for placeholder ids that replaced unused rows of a padded table — and
the base head's logits, so the vocabulary is the base one again, `config.vocab_size` included).
Inputs that hold placeholder ids beyond the base table raise `AdapterStateError` there, since the
base model has no embedding for them; inputs of original tokens only give the base model's
outputs bit for bit. Scaling is not defined: the new rows have no original to scale from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import (AdapterFormatError, AdapterStateError, ConfigError,
                              TargetNotFoundError)
from deltatune.methods.base import (MethodConfig, MethodHandle, base_weight, check_adapter_keys,
                                    freeze_all, load_modules_to_save_state,
                                    modules_to_save_state, parameters_of_modules, peft_key,
                                    replace_module, unfreeze_modules_to_save)

NEW_ROWS = "new_embeddings"
NEW_OUTPUT_ROWS = "new_output_embeddings"


@dataclass
class TextualInversionConfig(MethodConfig):
    """`placeholder_tokens`: the new token strings. `initializer_token`: a word (one token) whose
    embedding starts every new row; None starts them at the mean embedding. `token_ids`,
    `initializer_token_id` and `base_vocab_size` are recorded by `prepare`/`apply` and saved, so
    a saved adapter loads without the tokenizer step. `embedding_module` names the input
    embedding for models without `get_input_embeddings()`."""

    method_name: ClassVar[str] = "textual-inversion"
    peft_type: ClassVar[str] = "DELTATUNE_TEXTUAL_INVERSION"
    saves_tokenizer: ClassVar[bool] = True
    supports_disable: ClassVar[bool] = True

    placeholder_tokens: list[str] = field(default_factory=list)
    initializer_token: str | None = None
    embedding_module: str | None = None
    token_ids: list[int] = field(default_factory=list)
    initializer_token_id: int | None = None
    base_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.placeholder_tokens, str):
            self.placeholder_tokens = [self.placeholder_tokens]
        if not self.placeholder_tokens:
            raise ConfigError("textual-inversion: placeholder_tokens is empty; name the new "
                              "token(s), e.g. placeholder_tokens=['<my-style>']")
        if len(set(self.placeholder_tokens)) != len(self.placeholder_tokens):
            raise ConfigError(f"textual-inversion: placeholder_tokens {self.placeholder_tokens} "
                              "has duplicates; list each new token once")
        if len(set(self.token_ids)) != len(self.token_ids) or any(i < 0 for i in self.token_ids):
            raise ConfigError(f"textual-inversion: token_ids {self.token_ids} must be distinct "
                              "non-negative ids; leave them empty and call prepare(tokenizer)")
        if self.token_ids and len(self.token_ids) != len(self.placeholder_tokens):
            raise ConfigError(f"textual-inversion: {len(self.token_ids)} token_ids for "
                              f"{len(self.placeholder_tokens)} placeholder_tokens; give one id "
                              "per token or leave token_ids empty and call prepare(tokenizer)")

    def prepare(self, tokenizer: Any) -> None:
        """Adds the placeholder tokens to `tokenizer` and records their ids (and the initializer
        token's id). Idempotent: a tokenizer that already has them (saved with the adapter)
        keeps them."""
        added = tokenizer.get_added_vocab()
        vocabulary = tokenizer.get_vocab()
        clashes = [t for t in self.placeholder_tokens if t in vocabulary and t not in added]
        if clashes:
            raise ConfigError(f"textual-inversion: {clashes} already exist in the tokenizer's "
                              "vocabulary; choose placeholder strings it lacks, e.g. '<my-style>'")
        tokenizer.add_tokens([t for t in self.placeholder_tokens if t not in added])
        self.token_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in self.placeholder_tokens]
        if self.initializer_token is not None:
            self.initializer_token_id = _single_token_id(tokenizer, self.initializer_token)


def _single_token_id(tokenizer: Any, text: str) -> int:
    # Byte-level BPE vocabularies (GPT-2, SmolLM) hold most words with their leading space
    # ("Ġpainting"): that in-sentence form is the one to copy.
    for candidate in (text, " " + text):
        ids = tokenizer.encode(candidate, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    ids = tokenizer.encode(text, add_special_tokens=False)
    raise ConfigError(f"textual-inversion: initializer_token '{text}' is {len(ids)} tokens "
                      f"({tokenizer.convert_ids_to_tokens(ids)}); choose a word that is one "
                      "token, or leave it unset to start from the mean embedding")


# -- delta modules ---------------------------------------------------------------------------

class NewTokenLayout:
    """Where the new tokens go. Ids below the base row count (a tokenizer smaller than a padded
    embedding) replace unused rows; ids from the base row count up extend the table."""

    def __init__(self, token_ids: list[int], base_rows: int):
        self.token_ids = list(token_ids)
        self.base_rows = base_rows
        self.total_rows = max([base_rows, *(i + 1 for i in token_ids)])
        # Row of `new_embeddings` for each id, -1 for base ids.
        self.lookup = torch.full((self.total_rows,), -1, dtype=torch.long)
        self.lookup[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        # Ids past the base rows must all be ours: the model has no weights for any other.
        if (self.lookup[base_rows:] < 0).any():
            raise ConfigError(
                f"textual-inversion: token ids {token_ids} leave a gap after the model's "
                f"{base_rows} embedding rows (the tokenizer has more tokens than the model); "
                "resize the model to the tokenizer first (model.resize_token_embeddings"
                "(len(tokenizer)) before adding the placeholders)"
            )
        self.extension_rows = self.lookup[base_rows:].clone()
        self.replaced_ids = torch.tensor([i for i in token_ids if i < base_rows], dtype=torch.long)
        self.replaced_rows = self.lookup[self.replaced_ids]


class TextualInversionEmbedding(nn.Module):
    """Wraps the frozen input embedding (`base_layer`); the placeholder ids read their rows from
    the trainable `new_embeddings` (one row per placeholder token, in config order). With
    `delta_enabled` False it is the base embedding (ids past its table raise)."""

    def __init__(self, base_layer: nn.Embedding, layout: NewTokenLayout,
                 initial_rows: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.new_embeddings = nn.Parameter(initial_rows.clone())
        self.register_buffer("lookup", layout.lookup.clone(), persistent=False)
        self.delta_enabled = True

    @property
    def num_embeddings(self) -> int:
        return self.layout.total_rows

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.delta_enabled:
            return self._base_forward(input_ids)
        rows = self.lookup.to(input_ids.device)[input_ids]
        is_new = rows >= 0
        # Base lookup with the new ids pointed at row 0, then overwritten: keeps the base
        # layer's own forward (padding_idx, scaling subclasses) for every old token.
        base_ids = torch.where(is_new, torch.zeros_like(input_ids), input_ids)
        base = self.base_layer(base_ids)
        new = self.new_embeddings[rows.clamp(min=0)] * _embed_scale(self.base_layer)
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)

    def _base_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Checked here: an out-of-range id is an opaque device-side assert on GPUs.
        beyond = input_ids >= self.layout.base_rows
        if bool(beyond.any()):
            raise AdapterStateError(
                f"textual-inversion: the input holds placeholder token id(s) "
                f"{sorted(set(input_ids[beyond].tolist()))} that the base model has no embedding "
                "for; inside handle.disabled() the model is the base model, so give it inputs "
                "without the new tokens")
        return self.base_layer(input_ids)

    def merged_weight(self) -> torch.Tensor:
        """The base table with the new rows written in (and appended)."""
        return _table_with_rows(base_weight(self.base_layer), self.new_embeddings, self.layout)


class TextualInversionHead(nn.Module):
    """Wraps the frozen output head (`base_layer`) and adds one logit column per new token, from
    `rows` (the shared `new_embeddings` for a tied head, frozen copies otherwise). With
    `delta_enabled` False it is the base head (the base vocabulary's logits only)."""

    def __init__(self, base_layer: nn.Linear, layout: NewTokenLayout, rows: nn.Parameter):
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.rows = rows
        self.delta_enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)
        if not self.delta_enabled:
            return logits
        new_logits = F.linear(hidden, self.rows.to(hidden.dtype))
        if len(self.layout.replaced_ids):
            replaced = new_logits[..., self.layout.replaced_rows.to(hidden.device)]
            logits = logits.index_copy(-1, self.layout.replaced_ids.to(hidden.device), replaced)
        if len(self.layout.extension_rows):
            extension = new_logits[..., self.layout.extension_rows.to(hidden.device)]
            logits = torch.cat([logits, extension], dim=-1)
        return logits

    def merged_weight(self) -> torch.Tensor:
        return _table_with_rows(base_weight(self.base_layer), self.rows, self.layout)


def _embed_scale(layer: nn.Module) -> Any:
    # Some embeddings (Gemma's) multiply their output by a scale inside forward.
    return getattr(layer, "embed_scale", 1.0)


def _table_with_rows(weight: torch.Tensor, rows: torch.Tensor,
                     layout: NewTokenLayout) -> torch.Tensor:
    with torch.no_grad():
        table = torch.cat([weight, rows[layout.extension_rows].to(weight.dtype)], dim=0)
        if len(layout.replaced_ids):
            table[layout.replaced_ids] = rows[layout.replaced_rows].to(weight.dtype)
        return table


# -- handle ----------------------------------------------------------------------------------

class TextualInversionHandle(MethodHandle):
    config: TextualInversionConfig

    def __init__(self, model: nn.Module, config: TextualInversionConfig,
                 embedding_name: str, embedding: TextualInversionEmbedding,
                 head_name: str | None, head: TextualInversionHead | None,
                 saved_modules: list[str]):
        super().__init__(model, config, parameters_of_modules(model, saved_modules))
        self.embedding_name = embedding_name
        self.embedding = embedding
        self.head_name = head_name
        self.head = head
        self.saved_modules = saved_modules
        self._merged_modules: dict[str, nn.Module] = {}

    @property
    def head_is_tied(self) -> bool:
        return self.head is not None and self.head.rows is self.embedding.new_embeddings

    def delta_modules(self) -> list[nn.Module]:
        return [self.embedding] + ([self.head] if self.head is not None else [])

    def _set_delta_enabled(self, enabled: bool) -> None:
        super()._set_delta_enabled(enabled)
        layout = self.embedding.layout
        _set_vocab_size(self.model, layout.total_rows if enabled else layout.base_rows)

    def unsupported_message(self, capability: str) -> str:
        if capability == "scale":
            return ("textual-inversion: the new token rows have no original value to scale "
                    "from, so scaled()/set_delta_scale() are not defined; use handle.disabled() "
                    "for the base model")
        return super().unsupported_message(capability)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_state_access("state_dict()")
        state = {peft_key(self.embedding_name, NEW_ROWS): self.embedding.new_embeddings.detach()}
        if self.head is not None and not self.head_is_tied:
            state[peft_key(self.head_name, NEW_OUTPUT_ROWS)] = self.head.rows.detach()
        state.update(modules_to_save_state(self.model, self.saved_modules))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state_access("load_state_dict()")
        expected = self.state_dict()
        check_adapter_keys(expected, state, "textual-inversion")

        with torch.no_grad():
            self.embedding.new_embeddings.copy_(state[peft_key(self.embedding_name, NEW_ROWS)])
            if self.head is not None and not self.head_is_tied:
                self.head.rows.copy_(state[peft_key(self.head_name, NEW_OUTPUT_ROWS)])
        load_modules_to_save_state(self.model, self.saved_modules, state)

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Replaces the wrappers by a plain nn.Embedding (and head) of the new vocabulary size;
        a tied head keeps sharing the merged table."""
        if self.merged:
            return
        self._check_merge_allowed()
        base = self.embedding.base_layer
        embedding = nn.Embedding(self.embedding.num_embeddings, base.embedding_dim,
                                 padding_idx=base.padding_idx, device=base.weight.device,
                                 dtype=base.weight.dtype)
        embedding.weight = nn.Parameter(self.embedding.merged_weight(), requires_grad=False)
        replace_module(self.model, self.embedding_name, embedding)
        if self.head is not None:
            replace_module(self.model, self.head_name, self._merged_head(embedding))
        self.merged = True

    def _merged_head(self, embedding: nn.Embedding) -> nn.Linear:
        base = self.head.base_layer
        head = nn.Linear(base.in_features, self.embedding.num_embeddings,
                         bias=base.bias is not None, device=base.weight.device,
                         dtype=base.weight.dtype)
        head.weight = (embedding.weight if self.head_is_tied else
                       nn.Parameter(self.head.merged_weight(), requires_grad=False))
        if base.bias is not None:
            # New tokens get bias 0, as in the unmerged head, which adds no bias to them.
            bias = torch.zeros(head.out_features, dtype=base.bias.dtype, device=base.bias.device)
            bias[: base.out_features] = base.bias.detach()
            bias[self.head.layout.replaced_ids] = 0.0
            head.bias = nn.Parameter(bias, requires_grad=False)
        return head

    def unmerge(self) -> None:
        if not self.merged:
            return
        replace_module(self.model, self.embedding_name, self.embedding)
        if self.head is not None:
            replace_module(self.model, self.head_name, self.head)
        self.merged = False


# -- apply -----------------------------------------------------------------------------------

def _find_embedding(model: nn.Module, config: TextualInversionConfig) -> tuple[str, nn.Embedding]:
    if config.embedding_module:
        try:
            module = model.get_submodule(config.embedding_module)
        except AttributeError:
            module = None
    else:
        module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(module, nn.Embedding):
        embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        raise TargetNotFoundError(
            "textual-inversion: no input nn.Embedding found"
            f"{' at ' + repr(config.embedding_module) if config.embedding_module else ''}; pass "
            f"embedding_module=<name>, one of: {embeddings}")
    name = next(n for n, m in model.named_modules() if m is module)
    return name, module


def _find_output_head(model: nn.Module, embedding: nn.Embedding) -> tuple[str, nn.Linear] | None:
    """The output head whose rows are the vocabulary (logits per token), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.out_features != embedding.num_embeddings:
        return None
    return next(n for n, m in model.named_modules() if m is head), head


def _initial_rows(embedding: nn.Embedding, config: TextualInversionConfig,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    table = (embedding.weight if weight is None else weight).detach()
    if config.initializer_token_id is not None:
        row = table[config.initializer_token_id]
    else:
        row = table[: embedding.num_embeddings].mean(dim=0)
    return row.unsqueeze(0).repeat(len(config.placeholder_tokens), 1)


def _check_ready(config: TextualInversionConfig, base_rows: int) -> None:
    if not config.token_ids:
        raise ConfigError("textual-inversion: the placeholder tokens have no ids yet; call "
                          "config.prepare(tokenizer) before apply (it adds them to the tokenizer)")
    if config.base_vocab_size is not None and config.base_vocab_size != base_rows:
        raise AdapterFormatError(
            f"textual-inversion: the adapter was made for a base model with "
            f"{config.base_vocab_size} embedding rows but this one has {base_rows}; load it on "
            "the unmodified base model it was trained on (do not resize it first)")
    if config.initializer_token_id is not None and config.initializer_token_id >= base_rows:
        raise ConfigError(f"textual-inversion: initializer_token '{config.initializer_token}' "
                          "is not a token of the base model; choose an existing word")


def _set_vocab_size(model: nn.Module, size: int) -> None:
    # transformers' losses reshape logits with config.vocab_size.
    config = getattr(model, "config", None)
    if config is None:
        return
    for item in {id(c): c for c in (config, getattr(config, "get_text_config",
                                                    lambda: config)())}.values():
        if hasattr(item, "vocab_size"):
            item.vocab_size = size


def apply_textual_inversion(model: nn.Module,
                            config: TextualInversionConfig) -> TextualInversionHandle:
    """Freezes `model`, wraps its input embedding (and vocabulary head) with the new token rows;
    only those rows (and `modules_to_save`) train."""
    embedding_name, embedding = _find_embedding(model, config)
    _check_ready(config, embedding.num_embeddings)
    config.base_vocab_size = embedding.num_embeddings
    layout = NewTokenLayout(config.token_ids, embedding.num_embeddings)
    head_found = _find_output_head(model, embedding)
    freeze_all(model)

    wrapper = TextualInversionEmbedding(embedding, layout, _initial_rows(embedding, config))
    head_name, head = None, None
    if head_found is not None:
        head_name, head_layer = head_found
        if head_layer.weight is embedding.weight:
            rows = wrapper.new_embeddings
        else:
            # The untied head's new rows start like the input rows and stay frozen: textual
            # inversion learns what the new words mean as input, not how to emit them.
            rows = nn.Parameter(_initial_rows(embedding, config, head_layer.weight),
                                requires_grad=False)
        head = TextualInversionHead(head_layer, layout, rows)
        replace_module(model, head_name, head)
    replace_module(model, embedding_name, wrapper)
    _set_vocab_size(model, layout.total_rows)
    saved = unfreeze_modules_to_save(model, config.modules_to_save, "textual-inversion")
    return TextualInversionHandle(model, config, embedding_name, wrapper, head_name, head, saved)
