"""LoRA: trainable low-rank deltas on frozen Linear, Embedding and Conv2d layers, with rsLoRA
scaling and the DoRA (magnitude + direction) variant. `apply_lora` wraps each target layer in a
delta module (`LoraLinear`, `LoraEmbedding`, `LoraConv2d`) that keeps the frozen layer as
`base_layer` and adds `scaling * B(A(x))`; parameter names, shapes, initialisation and forward
maths follow Hugging Face PEFT 0.21, so `LoraHandle.state_dict()` has exactly the keys PEFT saves
and `LoraConfig.adapter_config()` is a PEFT LoraConfig: adapters move between the two both ways.
Every wrapper can be switched off (`handle.disabled()`: the base layer alone runs, the LoRA branch
is skipped) and scaled (`handle.scaled(alpha)`: W + alpha·ΔW, for DoRA W + alpha·(W_dora − W)).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import AdapterFormatError, ConfigError, TargetNotFoundError
from deltatune.methods.base import (PEFT_PREFIX, _REGEX_CHARS, MethodConfig, MethodHandle,
                                    all_linear_names, base_weight, find_modules, freeze_all,
                                    module_matches, modules_to_save_state,
                                    parameters_of_modules, peft_key, replace_module,
                                    suggest_target_names, unfreeze_modules_to_save)
from deltatune.methods.lora_fused import can_fuse, fused_lora_linear

ALL_LINEAR = "all-linear"
BIAS_OPTIONS = ("none", "all", "lora_only")
INIT_OPTIONS = ("default", "gaussian")
TARGET_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d)

# PEFT adds these heads to `modules_to_save` for task_type SEQ_CLS whether or not the model has
# them, and skips the ones it does not find; we do the same for configs read from PEFT files.
_PEFT_SEQ_CLS_HEADS = ("classifier", "score")

# PEFT options that change what the adapter computes; a file using them cannot be loaded yet.
_UNSUPPORTED_PEFT_OPTIONS = (
    "rank_pattern", "alpha_pattern", "fan_in_fan_out", "layers_to_transform", "lora_bias",
    "use_qalora", "use_bdlora", "target_parameters", "trainable_token_indices",
    "layer_replication", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
    "alora_invocation_tokens",
)

# transformers class-name suffix -> PEFT task_type, written so PEFT builds the matching PeftModel.
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
}


# -- config ----------------------------------------------------------------------------------

@dataclass
class LoraConfig(MethodConfig):
    """LoRA options. `targets` are module name patterns (see `base.module_matches`; a string is
    one pattern) or "all-linear" (every nn.Linear except the output head and `modules_to_save`);
    `exclude` removes matches again. `bias` trains no biases, all of them, or those of the
    targeted layers ("lora_only"), as PEFT. `init` "default" is PEFT's kaiming-uniform A and
    B = 0, "gaussian" draws A from N(0, 1/r). `task_type` (PEFT's, e.g. "CAUSAL_LM") is inferred
    from the model class when left None; it only tells PEFT which PeftModel to build."""

    method_name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    supports_disable: ClassVar[bool] = True
    supports_scale: ClassVar[bool] = True

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude: list[str] = field(default_factory=list)
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    task_type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.targets = list(self.targets)
        self.exclude = list(self.exclude or [])
        self.modules_to_save = list(dict.fromkeys(self.modules_to_save or []))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora: r must be a positive integer, got {self.r!r}; try r=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not self.alpha > 0:
            raise ConfigError(f"lora: alpha must be > 0, got {self.alpha!r}; "
                              "a common choice is alpha = 2 * r")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_OPTIONS:
            raise ConfigError(f"lora: bias must be one of {list(BIAS_OPTIONS)}, got {self.bias!r}")
        if self.init not in INIT_OPTIONS:
            raise ConfigError(f"lora: init must be one of {list(INIT_OPTIONS)}, got {self.init!r}")
        if not self.targets:
            raise ConfigError("lora: targets is empty; name module patterns such as "
                              "['q_proj', 'v_proj'] or use 'all-linear'")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def is_all_linear(self) -> bool:
        return [t.lower() for t in self.targets] == [ALL_LINEAR]

    def adapter_config(self) -> dict[str, Any]:
        """A PEFT LoraConfig as JSON (PEFT's field names; defaults for the options we lack)."""
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": (ALL_LINEAR if self.is_all_linear
                               else _peft_patterns(self.targets)),
            "exclude_modules": _peft_patterns(self.exclude) if self.exclude else None,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": list(self.modules_to_save) or None,
            "fan_in_fan_out": False,
            "init_lora_weights": True if self.init == "default" else self.init,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
            "base_model_name_or_path": None,
        }

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "LoraConfig":
        """Reads PEFT's adapter_config.json (or ours); refuses options that change the maths."""
        for option in _UNSUPPORTED_PEFT_OPTIONS:
            if config.get(option):
                raise ConfigError(
                    f"adapter_config.json: PEFT option {option}={config[option]!r} is not "
                    "supported yet by deltatune's LoRA; retrain without it or load the adapter "
                    "with PEFT"
                )
        return cls(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            targets=_read_peft_patterns(config.get("target_modules")) or ["q_proj", "v_proj"],
            exclude=_read_peft_patterns(config.get("exclude_modules")),
            bias=config.get("bias", "none"),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            init=_read_peft_init(config.get("init_lora_weights", True)),
            modules_to_save=list(config.get("modules_to_save") or []),
            task_type=config.get("task_type"),
        )


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA (Dettmers et al. 2023): LoRA on a base whose linear layers are frozen in NF4 with
    double quantization (deltatune.quant.nf4), LoRA factors in fp32. The same options and the
    same adapter files as LoRA: `--method qlora` is `--method lora --quantize nf4`."""

    method_name: ClassVar[str] = "qlora"
    base_quantization: ClassVar[str | None] = "nf4"


def _is_regex(pattern: str) -> bool:
    return bool(_REGEX_CHARS & set(pattern))  # the rule base.module_matches uses


def _peft_patterns(patterns: list[str]) -> list[str] | str:
    """PEFT matches list entries by name suffix and a single string as one full-match regex, so
    patterns that mix both kinds are written as one regex."""
    if not any(_is_regex(p) for p in patterns):
        return list(patterns)
    if len(patterns) == 1:
        return patterns[0]
    parts = [p if _is_regex(p) else rf"(?:.*\.)?{re.escape(p)}" for p in patterns]
    return "|".join(f"(?:{p})" for p in parts)


def _read_peft_patterns(value: list[str] | str | None) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return sorted(value)


def _read_peft_init(value: bool | str) -> str:
    # Loaded weights replace the initial ones, so inits that only change the random start load
    # fine; inits that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...) do not.
    if value is True or value is False:
        return "default"
    if value == "gaussian":
        return "gaussian"
    raise ConfigError(f"adapter_config.json: init_lora_weights={value!r} is not supported yet "
                      "by deltatune's LoRA (it changes the base weights); load it with PEFT")


# -- delta modules ---------------------------------------------------------------------------

class LoraLayer(nn.Module):
    """Common part of the LoRA wrappers: the frozen `base_layer`, the scaling and, for DoRA, the
    `lora_magnitude_vector`. Subclasses define the low-rank factors and their maths.

    `delta_enabled` False makes forward return `base_layer(x)` alone (the LoRA branch is not
    run at all, so the output is the base layer's bit for bit). `delta_scale` alpha multiplies
    the change the layer makes: plain LoRA computes W x + alpha·s·B A x; DoRA interpolates its
    rescaled weight, (W + alpha·(W_dora − W)) x, so alpha = 0 is the base layer for both. Merging
    folds the same scaled weight (`merged_weight`)."""

    # Names (relative to the wrapper) of the tensors saved in the adapter file.
    adapter_tensor_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, use_dora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = scaling
        self.use_dora = use_dora
        self.delta_enabled = True
        self.delta_scale = 1.0

    @property
    def effective_scaling(self) -> float:
        """The LoRA scaling times the delta scale (equal to `scaling` at alpha = 1)."""
        return self.scaling * self.delta_scale

    @staticmethod
    def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
        # Like PEFT's default autocast_adapter_dtype: half-precision bases get fp32 adapters.
        dtype = base_layer.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype of the LoRA factors (fp32 for half-precision bases)."""
        raise NotImplementedError

    def _init_magnitude(self) -> None:
        with torch.no_grad():
            delta = self.delta_weight()
            norm = self.weight_norm(base_weight(self.base_layer).to(delta.dtype) + delta)
        self.lora_magnitude_vector = nn.Parameter(norm)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        names = self.adapter_tensor_names + (("lora_magnitude_vector",) if self.use_dora else ())
        return {name: self.get_parameter(name).detach() for name in names}

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the layout of the base weight (the trained delta; `delta_scale` is
        applied on top by `scaled_delta_weight` and `merged_weight`)."""
        raise NotImplementedError

    def scaled_delta_weight(self) -> torch.Tensor:
        """delta_scale * scaling * B @ A: what merging plain LoRA adds to the base weight."""
        return _scaled(self.delta_weight(), self.delta_scale)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's norm of `weight`, shaped like `lora_magnitude_vector`."""
        raise NotImplementedError

    def weight_view(self, factor: torch.Tensor) -> torch.Tensor:
        """A magnitude-shaped factor reshaped to broadcast over the base weight."""
        raise NotImplementedError

    def dora_scale(self) -> torch.Tensor:
        """m / ||W + scaling BA||, the norm detached as in the DoRA paper (section 4.3) and PEFT."""
        with torch.no_grad():
            weight = base_weight(self.base_layer)
            delta = self.delta_weight()
            norm = self.weight_norm(weight.to(delta.dtype) + delta)
        return self.lora_magnitude_vector / norm

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the (scaled) delta folded in, computed in the adapter dtype:
        W + alpha·ΔW, for DoRA W + alpha·(W_dora − W)."""
        with torch.no_grad():
            weight = base_weight(self.base_layer)
            base = weight.to(self.lora_dtype)
            if not self.use_dora:
                return (base + self.scaled_delta_weight()).to(weight.dtype)
            merged = base + self.delta_weight()
            dora = self.weight_view(self.lora_magnitude_vector / self.weight_norm(merged)) * merged
            if self.delta_scale != 1.0:
                dora = base + self.delta_scale * (dora - base)
            return dora.to(weight.dtype)


def _scaled(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * delta; at alpha = 1 the tensor itself, so an unscaled adapter is untouched."""
    return delta if alpha == 1.0 else delta * alpha


def _add_scaled(result: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * delta in one pass, back in result's dtype."""
    if delta.dtype != result.dtype:
        return result + (delta * scaling).to(result.dtype)
    return torch.add(result, delta, alpha=scaling)


class LoraLinear(LoraLayer):
    """y = base(x) + scaling * B(A(dropout(x))); A is (r, in), B is (out, r), B = 0 at init."""

    adapter_tensor_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float = 0.0,
                 use_dora: bool = False, init: str = "default"):
        super().__init__(base_layer, r, scaling, use_dora)
        factory = {"device": base_layer.weight.device, "dtype": self.adapter_dtype(base_layer)}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        _init_factors(self.lora_A.weight, self.lora_B.weight, r, init)
        if use_dora:
            self._init_magnitude()

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.delta_enabled:
            return self.base_layer(x)
        if self._fusable(x):
            base = self.base_layer
            return fused_lora_linear(x, base.weight, base.bias, self.lora_A.weight,
                                     self.lora_B.weight, self.effective_scaling)
        result = self.base_layer(x)
        lora_x = x if self.lora_dropout is None or not self.training else self.lora_dropout(x)
        if lora_x.dtype != self.lora_A.weight.dtype:
            lora_x = lora_x.to(self.lora_A.weight.dtype)
        lora_out = F.linear(F.linear(lora_x, self.lora_A.weight), self.lora_B.weight)
        if not self.use_dora:
            return _add_scaled(result, lora_out, self.effective_scaling)
        return self._dora_forward(x, lora_x, result, lora_out)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Plain LoRA, no active dropout, an ordinary nn.Linear base, one dtype: one fused node
        (lora_fused.py) instead of four modules' worth of autograd."""
        return (not self.use_dora and (self.lora_dropout is None or not self.training)
                and type(self.base_layer) is nn.Linear
                and can_fuse(x, self.base_layer.weight, self.lora_A.weight))

    def _dora_forward(self, x: torch.Tensor, lora_x: torch.Tensor, result: torch.Tensor,
                      lora_out: torch.Tensor) -> torch.Tensor:
        # PEFT's form: base(x) + (m/n - 1) * W x' + (m/n) * scaling * B A x', x' = dropout(x).
        scale = self.dora_scale()
        if lora_x is x:
            bias = self.base_layer.bias
            base_out = result if bias is None else result - bias
        else:
            base_out = F.linear(lora_x, base_weight(self.base_layer).to(lora_x.dtype))
        dora = (scale - 1) * base_out + scale * (lora_out * self.scaling)
        return result + _scaled(dora, self.delta_scale).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=1)

    def weight_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(-1, 1)


class LoraEmbedding(LoraLayer):
    """y = base(ids) + scaling * embed(ids, A^T) @ B^T with PEFT's lora_embedding_A (r,
    num_embeddings) = 0 and lora_embedding_B (embedding_dim, r) ~ N(0, 1) at init, for either
    `init` (as PEFT). No dropout: PEFT's Embedding ignores lora_dropout too."""

    adapter_tensor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, use_dora: bool = False,
                 init: str = "default"):
        super().__init__(base_layer, r, scaling, use_dora)
        factory = {"device": base_layer.weight.device, "dtype": self.adapter_dtype(base_layer)}
        self.lora_embedding_A = nn.Parameter(
            torch.zeros(r, base_layer.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(
            torch.randn(base_layer.embedding_dim, r, **factory))
        if use_dora:
            self._init_magnitude()

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.lora_embedding_A.dtype

    def _embed_scale(self) -> torch.Tensor | float | None:
        # Scaled embeddings (e.g. Gemma) multiply inside forward; the delta needs the same factor.
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        return scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if not self.delta_enabled:
            return result
        after_A = F.embedding(ids, self.lora_embedding_A.t(),
                              padding_idx=self.base_layer.padding_idx)
        lora_out = after_A @ self.lora_embedding_B.t()
        embed_scale = self._embed_scale()
        if self.use_dora:
            scale = self.dora_scale()
            lora_out = scale * (lora_out * self.scaling)
            if embed_scale is not None:
                lora_out = lora_out * embed_scale
            if self.delta_scale == 1.0:
                return (scale * result + lora_out).to(result.dtype)
            dora = (scale - 1) * result + lora_out
            return (result + self.delta_scale * dora).to(result.dtype)
        if embed_scale is not None:
            lora_out = lora_out * embed_scale
        return _add_scaled(result, lora_out, self.effective_scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        # PEFT treats the embedding as fan_in_fan_out: one norm per embedding dimension.
        return torch.linalg.norm(weight, dim=0)

    def weight_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)


class LoraConv2d(LoraLayer):
    """y = base(x) + scaling * B(A(dropout(x))) with A = Conv2d(in, r, kernel, stride, padding)
    and B = Conv2d(r, out, 1x1), as PEFT."""

    adapter_tensor_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, dropout: float = 0.0,
                 use_dora: bool = False, init: str = "default"):
        super().__init__(base_layer, r, scaling, use_dora)
        factory = {"device": base_layer.weight.device, "dtype": self.adapter_dtype(base_layer)}
        self.lora_A = nn.Conv2d(base_layer.in_channels, r, base_layer.kernel_size,
                                base_layer.stride, base_layer.padding, bias=False, **factory)
        self.lora_B = nn.Conv2d(r, base_layer.out_channels, (1, 1), (1, 1), bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        _init_factors(self.lora_A.weight, self.lora_B.weight, r, init)
        if use_dora:
            self._init_magnitude()

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.delta_enabled:
            return result
        lora_x = x if self.lora_dropout is None or not self.training else self.lora_dropout(x)
        if lora_x.dtype != self.lora_A.weight.dtype:
            lora_x = lora_x.to(self.lora_A.weight.dtype)
        lora_out = self.lora_B(self.lora_A(lora_x))
        if not self.use_dora:
            return _add_scaled(result, lora_out, self.effective_scaling)
        scale = self.dora_scale()
        if lora_x is x:
            bias = self.base_layer.bias
            base_out = result if bias is None else result - bias.view(1, -1, 1, 1)
        else:
            base = self.base_layer
            base_out = F.conv2d(lora_x, base_weight(base).to(lora_x.dtype), None, base.stride,
                                base.padding, base.dilation, base.groups)
        dora = (scale - 1) * base_out + scale * (lora_out * self.scaling)
        return result + _scaled(dora, self.delta_scale).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight  # shape only
        product = self.lora_B.weight.view(-1, self.r) @ self.lora_A.weight.view(self.r, -1)
        return product.view(weight.shape) * self.scaling

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        # PEFT's layout for the conv magnitude: (1, out_channels, 1, 1).
        return torch.linalg.vector_norm(weight, dim=(1, 2, 3)).view(1, -1, 1, 1)

    def weight_view(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(-1, 1, 1, 1)


def _init_factors(weight_A: torch.Tensor, weight_B: torch.Tensor, r: int, init: str) -> None:
    """PEFT's init: A like nn.Linear's default (kaiming-uniform) or N(0, 1/r), B = 0, so the
    wrapped model starts out equal to the base model."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(weight_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
        nn.init.zeros_(weight_B)


# -- targets ---------------------------------------------------------------------------------

def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(input size, output size) of the linear map the delta adds to."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    kernel_h, kernel_w = layer.kernel_size
    return layer.in_channels * kernel_h * kernel_w, layer.out_channels


def _check_layer(name: str, layer: nn.Module, r: int) -> None:
    shape = tuple(layer.weight.shape)
    if r > min(_layer_shape(layer)):
        raise ConfigError(
            f"lora: r={r} is larger than layer '{name}' allows (weight shape {shape}, max rank "
            f"{min(_layer_shape(layer))}); lower r or exclude this layer"
        )
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros":
            raise ConfigError(
                f"lora: Conv2d '{name}' has groups={layer.groups}, dilation={layer.dilation}, "
                f"padding_mode='{layer.padding_mode}'; only groups=1, dilation 1 and zero padding "
                "are supported: exclude this layer"
            )


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _matching_names(model: nn.Module, patterns: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules()
            if n and any(module_matches(n, p) for p in patterns)]


def _modules_to_save_patterns(model: nn.Module, config: LoraConfig) -> list[str]:
    patterns = list(config.modules_to_save)
    if config.task_type == "SEQ_CLS":
        patterns = [p for p in patterns
                    if p not in _PEFT_SEQ_CLS_HEADS or _matching_names(model, [p])]
    return patterns


def _check_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the fully trained modules; raises before the model is changed when a pattern
    matches nothing."""
    names = []
    for pattern in patterns:
        hits = _matching_names(model, [pattern])
        if not hits:
            raise TargetNotFoundError(
                f"lora: modules_to_save '{pattern}' matches no module; top-level modules: "
                f"{[n for n, _ in model.named_children()]}")
        names.extend(hits)
    return names


def _find_targets(model: nn.Module, config: LoraConfig,
                  saved: list[str]) -> list[tuple[str, nn.Module]]:
    """Target layers by pattern (or all-linear), minus excluded ones, fully trained ones and any
    layer that already is or sits inside a LoRA wrapper."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if config.is_all_linear:
        patterns = [n for n in all_linear_names(model)
                    if not _inside(n, saved) and not _inside(n, wrapped)
                    and not any(module_matches(n, e) for e in config.exclude)]
        if not patterns:
            raise TargetNotFoundError(
                "lora: 'all-linear' found no nn.Linear layer besides the output head; valid "
                f"targets: {suggest_target_names(_matching_names(model, ['.*']))}")
    else:
        patterns = config.targets
    found = find_modules(model, patterns, TARGET_TYPES, "lora", exclude=config.exclude)
    return [(n, m) for n, m in found if not _inside(n, saved) and not _inside(n, wrapped)]


def _wrap(layer: nn.Module, config: LoraConfig) -> LoraLayer:
    if isinstance(layer, nn.Embedding):
        return LoraEmbedding(layer, config.r, config.scaling, config.use_dora, config.init)
    wrapper_class = LoraLinear if isinstance(layer, nn.Linear) else LoraConv2d
    return wrapper_class(layer, config.r, config.scaling, config.dropout, config.use_dora,
                         config.init)


def _infer_task_type(model: nn.Module) -> str | None:
    class_name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if class_name.endswith(suffix)),
                None)


# -- handle ----------------------------------------------------------------------------------

class LoraHandle(MethodHandle):
    """The LoRA-wrapped model: adapter weights under PEFT keys, merge/unmerge.

    Merging folds each delta into its base weight and puts the plain base layer back, so the
    merged model has no extra modules or cost. Plain LoRA merges in place and unmerges by
    subtracting the same delta (no extra memory; fp32 drift ~1e-7). DoRA, and layers whose
    weight another module shares (tied embeddings), merge into a new tensor and keep the
    original, so unmerge restores it exactly and the tied module never changes. While merged the
    LoRA factors are outside the model: unmerge before training further.

    `disabled()` skips every LoRA branch and swaps the trained biases and `modules_to_save` for
    copies of their values at apply time; `set_delta_scale(alpha)` scales every layer's change
    and `merge()` folds the scale in force (so the merged model equals the scaled one).
    """

    def __init__(self, model: nn.Module, config: LoraConfig, layers: dict[str, LoraLayer],
                 saved_modules: list[str], biases: dict[str, nn.Parameter]):
        super().__init__(model, config,
                         [*biases.values(), *parameters_of_modules(model, saved_modules)])
        self.layers = layers
        self.saved_modules = saved_modules
        self._biases = biases
        self._original_weights: dict[str, nn.Parameter] = {}

    def delta_modules(self) -> list[LoraLayer]:
        return list(self.layers.values())

    # -- adapter weights --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, unscaled: `delta_scale` is a runtime setting, not saved."""
        self._check_state_access("state_dict()")
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            for tensor_name, tensor in layer.adapter_tensors().items():
                state[peft_key(name, tensor_name)] = tensor
        state.update({key: bias.detach() for key, bias in self._biases.items()})
        state.update(modules_to_save_state(self.model, self.saved_modules))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads adapter weights (ours or PEFT's); missing, unexpected or misshapen tensors raise
        `AdapterFormatError` before anything is changed."""
        self._check_state_access("load_state_dict()")
        state, base_weights = self._normalise_peft_keys(state)
        targets = self.state_dict()
        _check_keys(targets, state)
        _check_shapes({**targets, **self._base_weight_targets(base_weights)},
                      {**state, **base_weights})
        was_merged = self.merged
        self.unmerge()
        with torch.no_grad():
            for key, tensor in targets.items():
                tensor.copy_(state[key])
            for key, tensor in self._base_weight_targets(base_weights).items():
                tensor.copy_(base_weights[key])
        if was_merged:
            self.merge()

    def _normalise_peft_keys(self, state: dict[str, torch.Tensor]
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Drops PEFT's wrapper copies of modules_to_save (`.original_module.`, `.modules_to_save.`,
        written for bias='all') and splits off the full embedding weights PEFT saves for targeted
        embeddings (`<module>.base_layer.weight`), which it loads into the base layer."""
        plain: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if ".original_module." in key:
                continue
            if ".modules_to_save." in key:
                unwrapped = re.sub(r"\.modules_to_save\.(default\.)?", ".", key)
                plain.setdefault(unwrapped, tensor)
                continue
            plain[key] = tensor
        embedding_keys = {peft_key(n, "base_layer.weight") for n, layer in self.layers.items()
                          if isinstance(layer, LoraEmbedding)}
        base_weights = {k: plain.pop(k) for k in list(plain) if k in embedding_keys}
        return plain, base_weights

    def _base_weight_targets(self, base_weights: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
        targets = {}
        for key in base_weights:
            name = key[len(PEFT_PREFIX):-len(".base_layer.weight")]
            targets[key] = self.layers[name].base_layer.weight.detach()
        return targets

    # -- merging ----------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Folds every delta, at the current `delta_scale`, into its base weight and puts the
        plain base layer back."""
        if self.merged:
            return
        self._check_merge_allowed()
        for name, layer in self.layers.items():
            base = layer.base_layer
            if layer.use_dora or _is_shared(self.model, base.weight):
                self._original_weights[name] = base.weight
                base.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
            else:
                with torch.no_grad():
                    base.weight += layer.scaled_delta_weight().to(base.weight.dtype)
            replace_module(self.model, name, base)
        self.merged = True

    def unmerge(self) -> None:
        """Puts the wrappers back and restores the base weights (exactly where a copy was kept,
        else by subtracting the same delta)."""
        if not self.merged:
            return
        for name, layer in self.layers.items():
            base = layer.base_layer
            if name in self._original_weights:
                base.weight = self._original_weights.pop(name)
            else:
                # The scale cannot change while merged, so this is the delta merge added.
                with torch.no_grad():
                    base.weight -= layer.scaled_delta_weight().to(base.weight.dtype)
            replace_module(self.model, name, layer)
        self.merged = False


def _is_shared(model: nn.Module, parameter: nn.Parameter) -> bool:
    """True when another module uses the same tensor (tied embeddings): merging in place would
    change that module too."""
    uses = sum(p is parameter for _, p in model.named_parameters(remove_duplicate=False))
    return uses > 1


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(
            f"lora adapter does not fit the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}; check that the adapter was "
            "trained on this base model with the same targets"
        )


def _check_shapes(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            module, _, param = key[len(PEFT_PREFIX):].rpartition(".")
            raise AdapterFormatError(
                f"lora adapter tensor '{param}' of module '{module}' has shape "
                f"{tuple(given[key].shape)} in the file but {tuple(tensor.shape)} in the model; "
                "the adapter was trained with another rank or on another base model"
            )


def _trainable_biases(model: nn.Module, config: LoraConfig,
                      layers: dict[str, LoraLayer]) -> dict[str, nn.Parameter]:
    """PEFT's bias options: 'all' trains every parameter with 'bias' in its name, 'lora_only'
    the biases of the wrapped layers (saved as `<module>.base_layer.bias`)."""
    if config.bias == "all":
        return {PEFT_PREFIX + n: p for n, p in model.named_parameters()
                if "bias" in n.rsplit(".", 1)[-1]}
    if config.bias == "lora_only":
        return {peft_key(n, "base_layer.bias"): layer.base_layer.bias
                for n, layer in layers.items()
                if getattr(layer.base_layer, "bias", None) is not None}
    return {}


# -- apply -----------------------------------------------------------------------------------

def apply_lora(model: nn.Module, config: LoraConfig) -> LoraHandle:
    """Freezes `model`, wraps every target layer in a LoRA delta module, unfreezes the LoRA
    factors, `modules_to_save` and the chosen biases. The handle's config records what was
    resolved: the module names 'all-linear' stood for and the task type (as PEFT does)."""
    save_patterns = _modules_to_save_patterns(model, config)
    saved = _check_modules_to_save(model, save_patterns)
    targets = _find_targets(model, config, saved)
    for name, layer in targets:
        _check_layer(name, layer, config.r)
    resolved = dataclasses.replace(
        config,
        targets=sorted(n for n, _ in targets) if config.is_all_linear else config.targets,
        task_type=config.task_type or _infer_task_type(model),
    )

    freeze_all(model)
    layers: dict[str, LoraLayer] = {}
    for name, layer in targets:
        layers[name] = _wrap(layer, resolved)
        replace_module(model, name, layers[name])
    saved_modules = unfreeze_modules_to_save(model, save_patterns, "lora")
    biases = _trainable_biases(model, resolved, layers)
    for bias in biases.values():
        bias.requires_grad_(True)
    return LoraHandle(model, resolved, layers, saved_modules, biases)


__all__ = ["LoraConfig", "LoraHandle", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d",
           "apply_lora"]
