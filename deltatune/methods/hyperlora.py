"""Hypernetwork LoRA: one small network generates the LoRA factors A (r x in) and B (out x r) of
every targeted layer from learned embeddings — a layer embedding (which block), a kind embedding
(q_proj vs v_proj, ...) and optionally a task embedding — so what trains is the generator, not
per-layer factors. Its size does not grow with depth except for one `layer_embedding_dim` row per
block. Layers of different shapes (q and v differ under grouped-query attention) get their own
output heads, one pair per (out, in) shape. B's head starts at zero, so the model starts equal to
the base. The generated factors export as an ordinary LoRA adapter (PEFT's files and keys),
which deltatune's `lora` method and PEFT load; `merge` generates and folds them into the weights.
`handle.disabled()` skips the generated branch (nothing is generated); `handle.scaled(alpha)`
scales the generated delta: W x + alpha·s·B A x, which `merge` folds as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_safetensors
from deltatune.methods.base import (MethodConfig, MethodHandle, check_adapter_keys, find_blocks,
                                    find_modules, freeze_all, modules_to_save_state,
                                    parameters_of_modules, peft_key, replace_module,
                                    unfreeze_modules_to_save)

GENERATOR_NAME = "hyperlora_generator"


@dataclass
class HyperLoraConfig(MethodConfig):
    """`r`, `alpha`, `dropout`, `targets`: as in LoRA (scaling alpha / r). The generator maps
    layer (+ kind, + task) embeddings of size `layer_embedding_dim` through one hidden layer of
    `hidden_dim` units to each target's factors. `num_tasks` > 0 adds a task embedding; pick the
    task with `handle.set_task(i)`. `block_module` overrides block detection."""

    method_name: ClassVar[str] = "hyperlora"
    peft_type: ClassVar[str] = "DELTATUNE_HYPERLORA"
    supports_disable: ClassVar[bool] = True
    supports_scale: ClassVar[bool] = True

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layer_embedding_dim: int = 32
    hidden_dim: int = 16
    num_tasks: int = 0
    block_module: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        for name in ("r", "layer_embedding_dim", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"hyperlora: {name} must be a positive integer, got {value!r}")
        if self.num_tasks < 0:
            raise ConfigError(f"hyperlora: num_tasks must be >= 0 (0 = no task embedding), got "
                              f"{self.num_tasks}")
        if not self.alpha > 0:
            raise ConfigError(f"hyperlora: alpha must be > 0, got {self.alpha!r}; try 2 * r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hyperlora: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("hyperlora: targets is empty; name module patterns such as "
                              "['q_proj', 'v_proj'] (BERT: ['query', 'value'])")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


# -- the generator ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetSlot:
    """What the generator needs to know about one target layer."""

    layer: int  # row of the layer embedding
    kind: int  # row of the kind embedding
    shape: str  # key of the output heads, "<out>x<in>"
    in_features: int
    out_features: int


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


class LoraGenerator(nn.Module):
    """e = layer_embedding[l] + kind_embedding[k] (+ task_embedding[t]); h = tanh(W e + b);
    A = head_A[shape](h) as (r, in); B = head_B[shape](h) as (out, r), with head_B zero at init."""

    def __init__(self, num_layers: int, num_kinds: int, shapes: dict[str, tuple[int, int]],
                 config: HyperLoraConfig):
        super().__init__()
        dim, hidden, r = config.layer_embedding_dim, config.hidden_dim, config.r
        self.r = r
        self.layer_embedding = nn.Embedding(num_layers, dim)
        self.kind_embedding = nn.Embedding(num_kinds, dim)
        self.task_embedding = nn.Embedding(config.num_tasks, dim) if config.num_tasks else None
        self.hidden = nn.Linear(dim, hidden)
        self.head_A = nn.ModuleDict({k: nn.Linear(hidden, r * i) for k, (o, i) in shapes.items()})
        self.head_B = nn.ModuleDict({k: nn.Linear(hidden, o * r) for k, (o, i) in shapes.items()})
        self.current_task = 0
        self._init_weights(shapes)

    def _init_weights(self, shapes: dict[str, tuple[int, int]]) -> None:
        with torch.no_grad():
            for embedding in (self.layer_embedding, self.kind_embedding, self.task_embedding):
                if embedding is not None:
                    nn.init.normal_(embedding.weight, std=1.0)
            for key, (_, in_features) in shapes.items():
                # Generated A entries get std ~ 1/sqrt(in), like LoRA's kaiming-uniform A
                # (tanh(h) has std ~0.5, hence the factor 2).
                head = self.head_A[key]
                nn.init.normal_(head.weight, std=2.0 / math.sqrt(in_features * head.in_features))
                nn.init.zeros_(head.bias)
                nn.init.zeros_(self.head_B[key].weight)
                nn.init.zeros_(self.head_B[key].bias)

    def features(self, slot: TargetSlot, task: int | None = None) -> torch.Tensor:
        device = self.layer_embedding.weight.device
        embedding = (self.layer_embedding(torch.tensor(slot.layer, device=device))
                     + self.kind_embedding(torch.tensor(slot.kind, device=device)))
        if self.task_embedding is not None:
            task = self.current_task if task is None else task
            embedding = embedding + self.task_embedding(torch.tensor(task, device=device))
        return torch.tanh(self.hidden(embedding))

    def generate(self, slot: TargetSlot, task: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for one target layer, shaped like LoRA's lora_A.weight and lora_B.weight."""
        hidden = self.features(slot, task)
        factor_A = self.head_A[slot.shape](hidden).view(self.r, slot.in_features)
        factor_B = self.head_B[slot.shape](hidden).view(slot.out_features, self.r)
        return factor_A, factor_B


class HyperLoraLinear(nn.Module):
    """y = base(x) + delta_scale * scaling * B(A(dropout(x))) with (A, B) generated for this
    layer; `delta_enabled` False runs the base layer alone. The generator is shared by all
    layers and registered once on the model, so it is only referenced here."""

    def __init__(self, base_layer: nn.Linear, slot: TargetSlot, generator: LoraGenerator,
                 scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.delta_enabled = True
        self.delta_scale = 1.0
        self._generator = (generator,)  # a tuple keeps nn.Module from registering it here

    @property
    def generator(self) -> LoraGenerator:
        return self._generator[0]

    @property
    def effective_scaling(self) -> float:
        return self.scaling * self.delta_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.delta_enabled:
            return result
        factor_A, factor_B = self.generator.generate(self.slot)
        lora_x = x if self.lora_dropout is None or not self.training else self.lora_dropout(x)
        lora_x = lora_x.to(factor_A.dtype)
        delta = F.linear(F.linear(lora_x, factor_A), factor_B) * self.effective_scaling
        return result + delta.to(result.dtype)

    def delta_weight(self, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """delta_scale * scaling * B @ A for the given factors."""
        factor_A, factor_B = factors
        return (factor_B @ factor_A) * self.effective_scaling


# -- handle ----------------------------------------------------------------------------------

class HyperLoraHandle(MethodHandle):
    config: HyperLoraConfig

    def __init__(self, model: nn.Module, config: HyperLoraConfig, generator: LoraGenerator,
                 layers: dict[str, HyperLoraLinear], saved_modules: list[str]):
        super().__init__(model, config, parameters_of_modules(model, saved_modules))
        self.generator = generator
        self.layers = layers
        self.saved_modules = saved_modules
        self._merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_task(self, task: int) -> None:
        """Selects the task embedding used by every later forward (and export/merge)."""
        if self.config.num_tasks == 0:
            raise ConfigError("hyperlora: this generator has no task embedding (num_tasks=0); "
                              "set num_tasks to the number of tasks when applying the method")
        if not 0 <= task < self.config.num_tasks:
            raise ConfigError(f"hyperlora: task {task} out of range; the generator was built "
                              f"with num_tasks={self.config.num_tasks} "
                              f"(tasks 0..{self.config.num_tasks - 1})")
        self.generator.current_task = task

    def delta_modules(self) -> list[HyperLoraLinear]:
        return list(self.layers.values())

    # -- adapter weights --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's weights; `delta_scale` is a runtime setting, not saved."""
        self._check_state_access("state_dict()")
        state = {peft_key(GENERATOR_NAME, n): t.detach()
                 for n, t in self.generator.state_dict().items()}
        state.update(modules_to_save_state(self.model, self.saved_modules))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state_access("load_state_dict()")
        expected = self.state_dict()
        check_adapter_keys(expected, state, "hyperlora")
        self.unmerge()
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(state[key])

    # -- export -----------------------------------------------------------------------------
    def lora_state_dict(self, task: int | None = None) -> dict[str, torch.Tensor]:
        """The generated factors as an ordinary LoRA's tensors, under PEFT's keys (unscaled:
        `delta_scale` is a runtime setting, as for LoRA's own files)."""
        self._check_state_access("lora_state_dict()")
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                factor_A, factor_B = self.generator.generate(layer.slot, task)
                state[peft_key(name, "lora_A.weight")] = factor_A.detach().clone()
                state[peft_key(name, "lora_B.weight")] = factor_B.detach().clone()
        state.update(modules_to_save_state(self.model, self.saved_modules))
        return state

    def lora_adapter_config(self) -> dict[str, Any]:
        """PEFT's adapter_config.json for the exported LoRA; targets are the exact module names,
        which PEFT and deltatune's `lora` both match by equality."""
        return {
            "peft_type": "LORA", "task_type": None, "r": self.config.r,
            "lora_alpha": self.config.alpha, "lora_dropout": self.config.dropout,
            "target_modules": sorted(self.layers), "exclude_modules": None, "bias": "none",
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "modules_to_save": list(self.config.modules_to_save) or None,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
            "inference_mode": True, "base_model_name_or_path": None,
        }

    def export_lora(self, directory: str | Path, task: int | None = None,
                    base_model_name_or_path: str | None = None) -> Path:
        """Writes the generated LoRA (for `task`, default the current one) as a PEFT LoRA adapter:
        adapter_config.json + adapter_model.safetensors. Returns the weights path."""
        if self.merged:
            raise ConfigError("hyperlora: unmerge() before export_lora; a merged model already "
                              "holds the delta in its weights")
        directory = Path(directory)
        config = self.lora_adapter_config()
        config["base_model_name_or_path"] = base_model_name_or_path
        weights = directory / "adapter_model.safetensors"
        write_safetensors(weights, self.lora_state_dict(task), metadata={"format": "pt"})
        write_json(directory / "adapter_config.json", config)
        return weights

    # -- merging ----------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Generates every layer's factors (current task) and adds delta_scale * scaling * B @ A
        to the base weight; the plain layers go back in place. The small factors are kept, so
        unmerge subtracts exactly the delta that was added even if the generator changed
        meanwhile."""
        if self.merged:
            return
        self._check_merge_allowed()
        with torch.no_grad():
            for name, layer in self.layers.items():
                factors = self.generator.generate(layer.slot)
                delta = layer.delta_weight(factors)
                layer.base_layer.weight += delta.to(layer.base_layer.weight.dtype)
                self._merged_factors[name] = factors
                replace_module(self.model, name, layer.base_layer)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            for name, layer in self.layers.items():
                delta = layer.delta_weight(self._merged_factors.pop(name))
                layer.base_layer.weight -= delta.to(layer.base_layer.weight.dtype)
                replace_module(self.model, name, layer)
        self.merged = False


def export_lora(handle: HyperLoraHandle, directory: str | Path, task: int | None = None) -> Path:
    """Function form of `HyperLoraHandle.export_lora`."""
    return handle.export_lora(directory, task)


# -- apply -----------------------------------------------------------------------------------

def _slots(model: nn.Module, targets: list[tuple[str, nn.Linear]],
           config: HyperLoraConfig) -> tuple[dict[str, TargetSlot], int, int]:
    """Layer row, kind row and shape key of every target, plus the row counts. Block i uses
    layer row i (every block has a row, so the count follows depth alone); a target outside the
    blocks gets a row of its own after them. The kind is the last name component (q_proj)."""
    stack = find_blocks(model, config.block_module)
    num_blocks = len(stack) if stack is not None else 0
    extra_rows: dict[str, int] = {}
    kind_rows: dict[str, int] = {}
    slots = {}
    for name, layer in targets:
        index = stack.index_of(name) if stack is not None else None
        row = index if index is not None else \
            num_blocks + extra_rows.setdefault(name, len(extra_rows))
        kind = kind_rows.setdefault(name.rsplit(".", 1)[-1], len(kind_rows))
        slots[name] = TargetSlot(row, kind, shape_key(layer.out_features, layer.in_features),
                                 layer.in_features, layer.out_features)
    return slots, num_blocks + len(extra_rows), len(kind_rows)


def apply_hyperlora(model: nn.Module, config: HyperLoraConfig) -> HyperLoraHandle:
    """Freezes `model`, wraps every target nn.Linear, registers the generator on the model as
    `hyperlora_generator`; the generator (and `modules_to_save`) trains."""
    targets = find_modules(model, config.targets, (nn.Linear,), "hyperlora")
    for name, layer in targets:
        if config.r > min(layer.in_features, layer.out_features):
            raise ConfigError(f"hyperlora: r={config.r} is larger than layer '{name}' allows "
                              f"(shape {tuple(layer.weight.shape)}); lower r")
    slots, num_layers, num_kinds = _slots(model, targets, config)
    shapes = {s.shape: (s.out_features, s.in_features) for s in slots.values()}
    freeze_all(model)
    reference = targets[0][1].weight
    generator = LoraGenerator(num_layers, num_kinds, shapes, config).to(
        device=reference.device,
        dtype=reference.dtype if reference.dtype == torch.float64 else torch.float32)
    model.add_module(GENERATOR_NAME, generator)
    layers = {}
    for name, layer in targets:
        layers[name] = HyperLoraLinear(layer, slots[name], generator, config.scaling,
                                       config.dropout)
        replace_module(model, name, layers[name])
    saved = unfreeze_modules_to_save(model, config.modules_to_save, "hyperlora")
    return HyperLoraHandle(model, config, generator, layers, saved)
