"""Shared machinery of the virtual-token methods: prompt tuning, P-tuning and prefix tuning.

These methods add p learned "virtual tokens" to every sequence and change no weight of the model.
deltatune changes models in place (no wrapper class), so the tokens enter through hooks on the
backbone (`model.model` of a Llama, `model.bert` of a BERT), which every caller goes through —
the training loop calling the backbone and the head itself, a classifier called as `model(...)`,
and `model.generate`. A forward pre-hook makes the virtual tokens part of the call — prepended
input embeddings (prompt tuning, P-tuning) or key/value prefixes pre-filled into the KV cache
(prefix tuning) — and extends the attention mask, position ids and token type ids to match; for
input-side tokens a forward hook then drops the p virtual positions from the backbone's output,
so callers see their original sequence length. In cached generation the tokens are injected once,
in the prefill call; later calls find them in the cache and only get the mask and positions
shifted by p. The trained encoder is saved as PEFT does: one tensor, `prompt_embeddings`, the
encoder's output, plus `modules_to_save` under `base_model.<module>.<param>`. Inside
`handle.disabled()` the hooks pass every call through unchanged (no virtual tokens, no mask or
position shift), so the model is the base model; scaling is not defined for virtual tokens.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import AdapterFormatError, ConfigError, MergeNotSupportedError
from deltatune.methods.base import (MethodConfig, MethodHandle, freeze_all, module_matches,
                                    parameters_of_modules, unfreeze_modules_to_save)

SAVED_KEY = "prompt_embeddings"
ENCODER_ATTRIBUTE = "prompt_encoder"
# PEFT keeps the bare transformers model as `base_model` for prompt-learning methods, so their
# modules_to_save are saved as `base_model.<module>.<param>` (verified against PEFT 0.21 output).
MODULES_PREFIX = "base_model."
_OTHER_MODULES_PREFIX = "base_model.model."
# PEFT adds these to modules_to_save for SEQ_CLS; names that match nothing are skipped, as in PEFT.
PEFT_CLASSIFIER_NAMES = ("classifier", "score")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_SUFFIXES = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                  ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"))


# -- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


def model_shape(model: nn.Module, method_name: str) -> ModelShape:
    """Layer count and attention geometry from the model's (text) config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{method_name}: needs a transformers model with a `.config` "
                          "(layer count, hidden size, heads); got a plain nn.Module")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{method_name}: encoder-decoder models (T5, BART) are not supported — "
                          "they need virtual tokens in both stacks; use LoRA or IA3 for them")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                      num_attention_heads=heads,
                      num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, vocab_size=config.vocab_size)


def find_backbone(model: nn.Module) -> nn.Module:
    """The module that turns token ids into hidden states: `getattr(model, base_model_prefix)`,
    or the model itself when it is the backbone."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return backbone if isinstance(backbone, nn.Module) else model


def infer_task_type(model: nn.Module) -> str:
    """PEFT's `task_type` for the model: PEFT picks its model class (and so how virtual tokens
    are fed) from it when loading the adapter."""
    name = type(model).__name__
    for suffix, task_type in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task_type
    if hasattr(model, "can_generate") and model.can_generate():
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def input_embeddings(backbone: nn.Module) -> nn.Module:
    return backbone.get_input_embeddings()


# -- configs -----------------------------------------------------------------------------------

@dataclass
class VirtualTokenConfig(MethodConfig):
    """Options shared by the virtual-token methods, named as in PEFT's PromptLearningConfig.
    The model-derived fields (`token_dim`, `num_layers`, `num_attention_heads`, `task_type`) are
    filled in by `apply`; when given (e.g. read from an adapter file) they must fit the model."""

    # The virtual tokens sit at the start of each row: packed examples would share them.
    supports_packing: ClassVar[bool] = False
    # Not injecting the tokens gives the base model; there is no weight delta to scale.
    supports_disable: ClassVar[bool] = True

    num_virtual_tokens: int = 20
    task_type: str | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1

    def model_dims(self, shape: ModelShape) -> dict[str, int]:
        """`token_dim`, `num_layers`, `num_attention_heads` as PEFT derives them for this model."""
        return {"token_dim": shape.hidden_size, "num_layers": shape.num_layers,
                "num_attention_heads": shape.num_attention_heads}

    def method_defaults(self, dims: dict[str, int]) -> dict[str, Any]:
        """Method-specific fields whose default depends on the model (e.g. encoder size)."""
        return {}

    def resolve(self, model: nn.Module) -> "VirtualTokenConfig":
        """A copy with every model-derived field filled in and checked against the model."""
        self.validate()
        dims = self.model_dims(model_shape(model, self.method_name))
        for name, value in dims.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ConfigError(
                    f"{self.method_name}: {name}={given} does not fit this model ({name}={value}); "
                    "the adapter was made for another base model — load it on that model, or "
                    f"leave {name} unset when training a new one")
        task_type = self.task_type or infer_task_type(model)
        return dataclasses.replace(self, task_type=task_type, **dims,
                                   **self.method_defaults(dims))

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{self.method_name}: num_virtual_tokens must be >= 1, "
                              f"got {self.num_virtual_tokens}")
        if self.num_transformer_submodules != 1:
            raise ConfigError(f"{self.method_name}: num_transformer_submodules="
                              f"{self.num_transformer_submodules} (encoder-decoder) is not "
                              "supported; only decoder-only and encoder-only models are")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"{self.method_name}: task_type '{self.task_type}' is not one of "
                              f"{list(TASK_TYPES)}; leave it unset to infer it from the model")

    def peft_fields(self) -> dict[str, Any]:
        """The method's own adapter_config.json fields (PEFT names and values)."""
        return {}

    def adapter_config(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "task_type": self.task_type,
            "num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim,
            "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
            "num_transformer_submodules": self.num_transformer_submodules,
            "modules_to_save": list(self.modules_to_save) or None,
            "inference_mode": True, "revision": None, "auto_mapping": None,
            **self.peft_fields(),
        }

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "MethodConfig":
        config = dict(config)
        # PEFT writes null for "none" and repeats its classifier names once per save.
        config["modules_to_save"] = list(dict.fromkeys(config.get("modules_to_save") or []))
        return super().from_adapter_config(config)


# -- hooks -------------------------------------------------------------------------------------

def cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2])  # legacy tuple of (key, value) per layer


def extend_attention_mask(mask: Any, num_virtual_tokens: int) -> torch.Tensor | None:
    """Marks the virtual tokens as visible: p ones in front of a 2-D padding mask."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 2:
        got = f"a {mask.dim()}-D tensor" if torch.is_tensor(mask) else type(mask).__name__
        raise ConfigError(
            f"virtual-token methods extend 2-D padding masks (batch, length) only; got {got}. "
            "Pass the 2-D mask and let the model build the 4-D one (static/compiled caches, "
            "which pre-build 4-D masks, are not supported)")
    ones = mask.new_ones(mask.shape[0], num_virtual_tokens)
    return torch.cat([ones, mask], dim=1)


def reject_packed_rows(call: dict[str, Any], method_name: str) -> None:
    """Packed rows (several examples per row: varlen boundaries, or position ids restarting
    without a mask) would give the virtual tokens to the first example of a row only: refuse
    them instead of training on that silently."""
    position_ids = call.get("position_ids")
    packed = call.get("cu_seq_lens_q") is not None or (
        call.get("attention_mask") is None and position_ids is not None
        and position_ids.shape[-1] > 1 and bool((torch.diff(position_ids, dim=-1) != 1).any()))
    if packed:
        raise ConfigError(f"{method_name}: packed sequences (several examples per row) cannot "
                          "share virtual tokens; turn packing off for this method")


class _CallSignature:
    """Turns a backbone call's positional arguments into keywords (BERT heads call
    `self.bert(input_ids, ...)`), so the hooks only deal with keywords."""

    def __init__(self, module: nn.Module):
        parameters = inspect.signature(module.forward).parameters
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [n for n, p in parameters.items() if p.kind in kinds]
        self.names = set(parameters)

    def as_keywords(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = dict(zip(self.positional, args))
        call.update(kwargs)
        return call


class VirtualTokenHooks:
    """Installs the pre-hook (and, for input-side tokens, the output hook) on the backbone.
    Subclasses define how the virtual tokens enter the first call of a sequence (`inject`).
    With `delta_enabled` False (the handle's `disabled()`) the hooks leave every call alone."""

    strips_output: ClassVar[bool] = False
    required_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, owner: nn.Module, backbone: nn.Module, num_virtual_tokens: int,
                 method_name: str):
        # The encoder is looked up on `owner` (the model) at each call, not captured, so a
        # deep copy of the model uses its own copy and a folded encoder is picked up.
        self.owner = owner
        self.backbone = backbone
        self.num_virtual_tokens = num_virtual_tokens
        self.method_name = method_name
        self.signature = _CallSignature(backbone)
        self.delta_enabled = True
        # One entry per backbone call in flight: whether the output hook must strip positions.
        self._pending: list[bool] = []
        self._hooks = [backbone.register_forward_pre_hook(self._before, with_kwargs=True)]
        if self.strips_output:
            self._hooks.append(backbone.register_forward_hook(self._after, always_call=True))

    @classmethod
    def check_backbone(cls, backbone: nn.Module, method_name: str) -> None:
        names = _CallSignature(backbone).names
        missing = [a for a in cls.required_arguments if a not in names]
        if missing:
            raise ConfigError(f"{method_name}: the backbone {type(backbone).__name__}.forward has "
                              f"no {missing} argument(s), which this method needs")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _before(self, module: nn.Module, args: tuple,
                kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self.delta_enabled:
            if self.strips_output:
                self._pending.append(False)
            return None
        call = self.signature.as_keywords(args, kwargs)
        reject_packed_rows(call, self.method_name)
        first_call = cache_length(call.get("past_key_values")) == 0
        if first_call:
            self.inject(call)
        else:
            self.continue_cached(call)
        if self.strips_output:
            self._pending.append(first_call)
        return (), call

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        stripped = self._pending.pop() if self._pending else False
        if not stripped or output is None:
            return None
        return strip_virtual_positions(output, self.num_virtual_tokens)

    def virtual_tokens(self) -> torch.Tensor:
        """The encoder's output, (p, width)."""
        return getattr(self.owner, ENCODER_ATTRIBUTE)()

    def inject(self, call: dict[str, Any]) -> None:
        raise NotImplementedError

    def continue_cached(self, call: dict[str, Any]) -> None:
        """A later generation step: the virtual tokens are in the cache already, so only the
        mask and the positions (which the caller counts without them) move by p."""
        p = self.num_virtual_tokens
        call["attention_mask"] = extend_attention_mask(call.get("attention_mask"), p)
        if call.get("position_ids") is not None:
            call["position_ids"] = call["position_ids"] + p

    @staticmethod
    def batch_and_length(call: dict[str, Any]) -> tuple[int, int, torch.device]:
        reference = call.get("input_ids")
        if reference is None:
            reference = call.get("inputs_embeds")
        if reference is None:
            raise ConfigError("the backbone was called with neither input_ids nor inputs_embeds")
        return reference.shape[0], reference.shape[1], reference.device


class InputTokenHooks(VirtualTokenHooks):
    """Prompt tuning / P-tuning: the virtual token embeddings are prepended to the input
    embeddings, at positions 0..p-1 (real tokens move to p..), as PEFT does."""

    strips_output = True
    required_arguments = ("input_ids", "inputs_embeds")

    def inject(self, call: dict[str, Any]) -> None:
        p = self.num_virtual_tokens
        embeds = call.get("inputs_embeds")
        if embeds is None:
            if call.get("input_ids") is None:
                raise ConfigError("the backbone was called with neither input_ids nor "
                                  "inputs_embeds")
            embeds = input_embeddings(self.backbone)(call["input_ids"])
        prompts = self.virtual_tokens().to(device=embeds.device, dtype=embeds.dtype)
        batch = embeds.shape[0]
        call["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], 1)
        call["input_ids"] = None
        call["attention_mask"] = extend_attention_mask(call.get("attention_mask"), p)
        if call.get("position_ids") is not None:
            call["position_ids"] = prepend_positions(call["position_ids"], p)
        if call.get("token_type_ids") is not None:
            token_types = call["token_type_ids"]
            zeros = token_types.new_zeros(*token_types.shape[:-1], p)
            call["token_type_ids"] = torch.cat([zeros, token_types], dim=-1)


def prepend_positions(position_ids: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Positions 0..p-1 for the virtual tokens, the caller's positions shifted by p after them."""
    virtual = torch.arange(num_virtual_tokens, device=position_ids.device, dtype=position_ids.dtype)
    virtual = virtual.expand(*position_ids.shape[:-1], num_virtual_tokens)
    return torch.cat([virtual, position_ids + num_virtual_tokens], dim=-1)


def strip_virtual_positions(output: Any, num_virtual_tokens: int) -> Any:
    """The backbone output without the p virtual positions (last_hidden_state, hidden_states).
    Anything computed inside the backbone from all positions (BERT's pooler) is left alone."""
    p = num_virtual_tokens
    if isinstance(output, tuple):
        return (output[0][:, p:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, p:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
    return output


# -- the handle --------------------------------------------------------------------------------

class VirtualTokenEncoder(nn.Module):
    """What the three methods' encoders share: `forward()` gives the tensor that is saved (and,
    reshaped, used); `load_saved` replaces the encoder by that tensor, as PEFT's inference mode
    does — the reparameterising network is dropped and the loaded tensor is used directly."""

    def saved_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def load_saved(self, tensor: torch.Tensor) -> None:
        expected = self.saved_shape()
        if tuple(tensor.shape) != expected:
            raise AdapterFormatError(
                f"'{SAVED_KEY}' has shape {tuple(tensor.shape)} but this model and config need "
                f"{expected} (num_virtual_tokens x width); was the adapter trained on another "
                "base model or with another num_virtual_tokens?")
        self.fold(tensor)

    def fold(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError


def folded_embedding(tensor: torch.Tensor, like: torch.Tensor) -> nn.Embedding:
    """An nn.Embedding holding `tensor` (trainable, on the device/dtype of `like`)."""
    embedding = nn.Embedding(tensor.shape[0], tensor.shape[1], device=like.device, dtype=like.dtype)
    with torch.no_grad():
        embedding.weight.copy_(tensor)
    return embedding


def resolve_modules_to_save(model: nn.Module, config: VirtualTokenConfig) -> list[str]:
    """The config's modules_to_save plus, for SEQ_CLS, PEFT's classifier names that exist."""
    patterns = list(dict.fromkeys(config.modules_to_save))
    if config.task_type == "SEQ_CLS":
        patterns += [n for n in PEFT_CLASSIFIER_NAMES if n not in patterns]
    names = [n for n, _ in model.named_modules() if n]
    return [p for p in patterns
            if p not in PEFT_CLASSIFIER_NAMES or any(module_matches(n, p) for n in names)]


class VirtualTokenHandle(MethodHandle):
    """Handle of a virtual-token method: the encoder lives at `model.prompt_encoder`, the hooks
    on the backbone. `remove()` takes both out again."""

    def __init__(self, model: nn.Module, config: VirtualTokenConfig, hooks: VirtualTokenHooks,
                 saved_modules: list[str]):
        super().__init__(model, config, parameters_of_modules(model, saved_modules))
        self.hooks = hooks
        self.saved_modules = saved_modules

    def delta_modules(self) -> list[VirtualTokenHooks]:
        return [self.hooks]

    def unsupported_message(self, capability: str) -> str:
        if capability == "scale":
            return (f"{self.config.method_name}: virtual tokens are extra inputs, not a weight "
                    "delta, so scaled()/set_delta_scale() are not defined; use "
                    "handle.disabled() for the base model, or a method whose config has "
                    "supports_scale=True (LoRA, IA3, bottleneck adapters, HyperLoRA)")
        return super().unsupported_message(capability)

    @property
    def encoder(self) -> VirtualTokenEncoder:
        return getattr(self.model, ENCODER_ATTRIBUTE)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_state_access("state_dict()")
        state = {SAVED_KEY: self.encoder().detach().cpu()}
        for name in self.saved_modules:
            for param_name, tensor in self.model.get_submodule(name).state_dict().items():
                state[f"{MODULES_PREFIX}{name}.{param_name}"] = tensor
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state_access("load_state_dict()")
        if SAVED_KEY not in state:
            raise AdapterFormatError(f"the adapter weights have no '{SAVED_KEY}' tensor (keys: "
                                     f"{sorted(state)[:5]}); is this a {self.config.method_name} "
                                     "adapter?")
        self.encoder.load_saved(state[SAVED_KEY])
        for name in self.saved_modules:
            for param_name, tensor in self.model.get_submodule(name).state_dict().items():
                key = _module_key(state, name, param_name)
                if key is None:
                    raise AdapterFormatError(
                        f"the adapter weights lack '{MODULES_PREFIX}{name}.{param_name}' "
                        f"(module '{name}' is in modules_to_save)")
                tensor.copy_(state[key])

    def merge(self) -> None:
        raise MergeNotSupportedError(
            f"{self.config.method_name}: the {self.config.num_virtual_tokens} virtual tokens are "
            "extra inputs, not weight deltas, so there is nothing to fold into the base weights; "
            "keep the adapter applied (deltatune.load_adapter or PEFT's PeftModel.from_pretrained)")

    def unmerge(self) -> None:
        self.merge()

    def remove(self) -> None:
        """Takes the method out of the model: hooks removed, encoder deleted."""
        self.hooks.remove()
        if hasattr(self.model, ENCODER_ATTRIBUTE):
            delattr(self.model, ENCODER_ATTRIBUTE)


def _module_key(state: dict[str, torch.Tensor], name: str, param_name: str) -> str | None:
    for prefix in (MODULES_PREFIX, _OTHER_MODULES_PREFIX):
        if f"{prefix}{name}.{param_name}" in state:
            return f"{prefix}{name}.{param_name}"
    return None


def install(model: nn.Module, config: VirtualTokenConfig, encoder: VirtualTokenEncoder,
            hooks_class: type[VirtualTokenHooks], **hook_options: Any) -> VirtualTokenHandle:
    """Freezes the model, attaches `encoder` as `model.prompt_encoder`, hooks the backbone and
    unfreezes modules_to_save. `config` must be resolved (`VirtualTokenConfig.resolve`)."""
    if hasattr(model, ENCODER_ATTRIBUTE):
        raise ConfigError(f"{config.method_name}: the model already has a '{ENCODER_ATTRIBUTE}' "
                          "(a virtual-token method is applied already?); apply one per model, or "
                          "call the first handle's remove()")
    backbone = find_backbone(model)
    hooks_class.check_backbone(backbone, config.method_name)
    freeze_all(model)
    saved = resolve_modules_to_save(model, config)
    saved_modules = unfreeze_modules_to_save(model, saved, config.method_name)
    setattr(model, ENCODER_ATTRIBUTE, encoder)
    hooks = hooks_class(model, backbone, config.num_virtual_tokens, config.method_name,
                        **hook_options)
    config = dataclasses.replace(config, modules_to_save=saved)
    return VirtualTokenHandle(model, config, hooks, saved_modules)


def repeat_to_length(token_ids: list[int], length: int) -> list[int]:
    """PEFT's rule for text initialisation: the text's tokens repeated, then cut, to `length`."""
    return (list(token_ids) * math.ceil(length / len(token_ids)))[:length]


def embedding_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the encoder is created: the embedding's device, fp32 unless the model is fp64
    (PEFT keeps prompt encoders in fp32 for half-precision models too)."""
    weight = input_embeddings(find_backbone(model)).weight
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    return weight.device, dtype
