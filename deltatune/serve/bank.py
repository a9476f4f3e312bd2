"""Many adapters on one base model: `AdapterBank` loads saved LoRA (rsLoRA, DoRA, QLoRA) and IA3
adapters by name onto a single frozen base and routes every row of a batch to its own adapter
(or to none), so one forward pass serves requests for different adapters.

Each targeted layer of the base is wrapped once in a `RoutedLinear` / `RoutedEmbedding` that
holds the deltas of every loaded adapter for that layer. Before a forward pass the bank sets a
`Routing`: for each adapter present in the batch, the indices of its rows. A layer then runs the
base computation once for the whole batch and adds each adapter's low-rank term on its rows only
(`index_select` → two small matmuls → `index_add`), one pass per adapter present, never per row;
IA3 vectors are gathered per row and multiplied in. Rows routed to no adapter get the base output
bit for bit. `activate(name)` makes one adapter the default for whole batches (switching is a
routing change, no weights move); `offload` drops an adapter's tensors from memory (its folder is
re-read on `restore`, or on its next use), `unload` removes it. `merge(name)` folds one adapter
into the base weights (the "swap" serving policy and its baseline); `unmerge` restores them
exactly. The bank reads adapter files itself (no method handle is applied), so loading one is a
file read plus a few tensor copies.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.methods.adapter_io import WEIGHTS_NAME, read_adapter_config, read_adapter_weights
from deltatune.methods.base import PEFT_PREFIX, MethodConfig, base_weight, replace_module
from deltatune.methods.ia3 import IA3Config, _is_feedforward
from deltatune.methods.lora import LoraConfig

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# -- the per-layer deltas --------------------------------------------------------------------

class LayerDelta:
    """One adapter's change to one layer, applied to the rows routed to it."""

    scales_input = False

    def input_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, output: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None,
               base_layer: nn.Module) -> torch.Tensor:
        """`output` (the base layer's output for the whole batch) with this delta added on
        `rows` (None: every row)."""
        raise NotImplementedError

    def merged_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The base weight with this delta folded in (for `AdapterBank.merge`)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "LayerDelta":
        raise NotImplementedError

    def numel(self) -> int:
        raise NotImplementedError


def _rows_of(tensor: torch.Tensor, rows: torch.Tensor | slice | None) -> torch.Tensor:
    if rows is None:
        return tensor
    if isinstance(rows, slice):
        return tensor[rows]  # a view: the engine sorts a batch so each adapter's rows are a run
    return tensor.index_select(0, rows)


def _add_on_rows(output: torch.Tensor, rows: torch.Tensor | slice | None,
                 delta: torch.Tensor) -> torch.Tensor:
    """output + delta on `rows`, in place (the output is the base layer's fresh tensor)."""
    delta = delta.to(output.dtype)
    if rows is None:
        return output.add_(delta)
    if isinstance(rows, slice):
        output[rows] += delta
        return output
    return output.index_add_(0, rows, delta)


@dataclass
class LoraLinearDelta(LayerDelta):
    """scaling · B A x on the routed rows; for DoRA the rescaled form
    (m/n − 1)·W x + (m/n)·scaling·B A x with the norm n = ||W + scaling·B A|| fixed at load."""
    lora_A: torch.Tensor          # (r, in)
    lora_B: torch.Tensor          # (out, r)
    scaling: float
    dora_scale: torch.Tensor | None = None   # (out,) m / n, DoRA only

    def add_to(self, output, x, rows, base_layer):
        if self.dora_scale is None and not isinstance(rows, torch.Tensor) \
                and x.dtype == output.dtype == self.lora_A.dtype and output.is_contiguous():
            return self._add_in_place(output, x, rows)
        x_rows = _rows_of(x, rows).to(self.lora_A.dtype)
        low_rank = F.linear(F.linear(x_rows, self.lora_A), self.lora_B) * self.scaling
        if self.dora_scale is None:
            return _add_on_rows(output, rows, low_rank)
        base_rows = _rows_of(output, rows).to(low_rank.dtype)
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            base_rows = base_rows - bias.to(low_rank.dtype)
        change = (self.dora_scale - 1) * base_rows + self.dora_scale * low_rank
        return _add_on_rows(output, rows, change)

    def _add_in_place(self, output: torch.Tensor, x: torch.Tensor,
                      rows: slice | None) -> torch.Tensor:
        # The fast path for whole batches and contiguous runs of rows: two kernels per adapter
        # and layer (x·Aᵀ, then an addmm into the output's own rows), no copies.
        x_rows = _rows_of(x, rows)
        target = _rows_of(output, rows).view(-1, output.shape[-1])
        after_A = F.linear(x_rows.reshape(-1, x.shape[-1]), self.lora_A)
        target.addmm_(after_A, self.lora_B.t(), alpha=self.scaling)
        return output

    def merged_weight(self, base_layer):
        weight = base_weight(base_layer)
        delta = (self.lora_B @ self.lora_A) * self.scaling
        merged = weight.to(delta.dtype) + delta
        if self.dora_scale is not None:
            merged = self.dora_scale.view(-1, 1) * merged
        return merged.to(weight.dtype)

    def to(self, device):
        return LoraLinearDelta(self.lora_A.to(device), self.lora_B.to(device), self.scaling,
                               None if self.dora_scale is None else self.dora_scale.to(device))

    def numel(self):
        return self.lora_A.numel() + self.lora_B.numel() + (
            0 if self.dora_scale is None else self.dora_scale.numel())


@dataclass
class LoraEmbeddingDelta(LayerDelta):
    """scaling · embed(ids, Aᵀ) Bᵀ on the routed rows (plain LoRA; PEFT's Embedding layout)."""
    lora_embedding_A: torch.Tensor   # (r, num_embeddings)
    lora_embedding_B: torch.Tensor   # (dim, r)
    scaling: float

    def add_to(self, output, x, rows, base_layer):
        after_A = F.embedding(_rows_of(x, rows), self.lora_embedding_A.t(),
                              padding_idx=base_layer.padding_idx)
        change = (after_A @ self.lora_embedding_B.t()) * self.scaling
        embed_scale = getattr(base_layer, "embed_scale", None)
        if embed_scale is not None:
            change = change * embed_scale
        return _add_on_rows(output, rows, change)

    def merged_weight(self, base_layer):
        delta = (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling
        return (base_layer.weight.to(delta.dtype) + delta).to(base_layer.weight.dtype)

    def to(self, device):
        return LoraEmbeddingDelta(self.lora_embedding_A.to(device),
                                  self.lora_embedding_B.to(device), self.scaling)

    def numel(self):
        return self.lora_embedding_A.numel() + self.lora_embedding_B.numel()


@dataclass
class IA3Delta(LayerDelta):
    """IA3's learned vector: it scales the layer's output, or for a feedforward layer its input."""
    vector: torch.Tensor     # (out,) or, feedforward, (in,)
    feedforward: bool

    @property
    def scales_input(self) -> bool:  # type: ignore[override]
        return self.feedforward

    def input_scale(self):
        return self.vector

    def add_to(self, output, x, rows, base_layer):
        if self.feedforward:
            return output  # applied to the input before the base layer ran
        vector = self.vector.to(output.dtype)
        if rows is None:
            return output.mul_(vector)
        if isinstance(rows, slice):
            output[rows] *= vector
            return output
        return output.index_copy_(0, rows, output.index_select(0, rows) * vector)

    def merged_weight(self, base_layer):
        weight = base_weight(base_layer)
        vector = self.vector.to(weight.dtype)
        return weight * (vector.view(1, -1) if self.feedforward else vector.view(-1, 1))

    def merged_bias(self, base_layer: nn.Module) -> torch.Tensor | None:
        bias = getattr(base_layer, "bias", None)
        if bias is None or self.feedforward:
            return bias
        return bias * self.vector.to(bias.dtype)

    def to(self, device):
        return IA3Delta(self.vector.to(device), self.feedforward)

    def numel(self):
        return self.vector.numel()


# -- routing ---------------------------------------------------------------------------------

@dataclass
class Routing:
    """Which rows of the current batch go to which adapter: (name, rows) with rows a slice (a
    contiguous run), an index tensor, or None for every row. Rows absent from every group use
    the base model."""
    groups: list[tuple[str, torch.Tensor | slice | None]] = field(default_factory=list)
    batch_size: int | None = None


class _RoutedLayer(nn.Module):
    """Common part of the routed wrappers: the frozen base layer, the deltas by adapter name and
    a reference to the bank's current routing."""

    def __init__(self, base_layer: nn.Module, routing_source: "AdapterBank"):
        super().__init__()
        self.base_layer = base_layer
        self.deltas: dict[str, LayerDelta] = {}
        # A plain attribute, not a submodule: the bank is not part of the model's state.
        object.__setattr__(self, "_bank", routing_source)

    def _active(self) -> list[tuple[LayerDelta, torch.Tensor | slice | None]]:
        routing = self._bank.routing
        return [(self.deltas[name], rows) for name, rows in routing.groups
                if name in self.deltas]


class RoutedLinear(_RoutedLayer):
    """A base nn.Linear plus the deltas of every adapter that targets it, applied per row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base_layer(x)
        input_scaled = [(delta, rows) for delta, rows in active if delta.scales_input]
        if input_scaled:
            x_in = _scale_inputs(x, input_scaled)
            output = self.base_layer(x_in)
        else:
            output = self.base_layer(x)
        for delta, rows in active:
            output = delta.add_to(output, x, rows, self.base_layer)
        return output


def _scale_inputs(x: torch.Tensor,
                  groups: list[tuple[LayerDelta, torch.Tensor | slice | None]]
                  ) -> torch.Tensor:
    """x with each group's IA3 input vector applied on its rows (ones elsewhere)."""
    if len(groups) == 1 and groups[0][1] is None:
        return x * groups[0][0].input_scale().to(x.dtype)
    scale = torch.ones(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    for delta, rows in groups:
        if rows is None:
            scale = scale * delta.input_scale().to(x.dtype)
        else:
            scale[rows] = delta.input_scale().to(x.dtype)
    return x * scale.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])


class RoutedEmbedding(_RoutedLayer):
    """A base nn.Embedding plus the LoRA deltas of every adapter that targets it, per row."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(ids)
        for delta, rows in self._active():
            output = delta.add_to(output, ids, rows, self.base_layer)
        return output


# -- the bank --------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    name: str
    path: str | None
    method: str
    rank: int | None
    parameters: int
    resident: bool
    load_seconds: float
    layers: int


@dataclass
class _Adapter:
    info: AdapterInfo
    config: MethodConfig
    deltas: dict[str, LayerDelta] | None     # None while offloaded to disk
    offloaded_to_cpu: bool = False


class AdapterBank:
    """One frozen base model and any number of named adapters, routed per row (see the module
    docstring). Not thread-safe by itself: the serving engine calls it from one thread."""

    def __init__(self, model: nn.Module):
        self.model = model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.routing = Routing()
        self._layers: dict[str, _RoutedLayer] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._default: str | None = None
        self._merged: tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = None
        self.lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------------
    def load(self, name: str, directory: str | Path) -> AdapterInfo:
        """Reads an adapter folder (deltatune's or PEFT's files) and adds it under `name`."""
        self._check_new_name(name)
        start = time.perf_counter()
        config = read_adapter_config(directory)
        state = read_adapter_weights(Path(directory) / WEIGHTS_NAME)
        return self.add(name, config, state, path=str(directory),
                        started=start)

    def add(self, name: str, config: MethodConfig, state: dict[str, torch.Tensor],
            path: str | None = None, started: float | None = None) -> AdapterInfo:
        """Adds an adapter from its config and PEFT-keyed tensors (what `load` reads)."""
        self._check_new_name(name)
        start = time.perf_counter() if started is None else started
        deltas = self._build_deltas(config, state, name)
        for module_name in deltas:
            self._wrap(module_name)
        for module_name, delta in deltas.items():
            self._layers[module_name].deltas[name] = delta
        info = AdapterInfo(name=name, path=path, method=config.method_name,
                           rank=getattr(config, "r", None),
                           parameters=sum(d.numel() for d in deltas.values()), resident=True,
                           load_seconds=round(time.perf_counter() - start, 4),
                           layers=len(deltas))
        self._adapters[name] = _Adapter(info, config, deltas)
        return info

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise ConfigError(f"adapter name {name!r} is not allowed: use 1-64 characters from "
                              "A-Z a-z 0-9 . _ -")
        if name in self._adapters:
            raise ConfigError(f"an adapter named '{name}' is already loaded; unload it first or "
                              "pick another name")

    def _build_deltas(self, config: MethodConfig, state: dict[str, torch.Tensor],
                      name: str) -> dict[str, LayerDelta]:
        if config.modules_to_save:
            raise AdapterFormatError(
                f"adapter '{name}' also trains whole modules {config.modules_to_save}, which "
                "cannot be switched per request: merge it into the base with `deltatune "
                "export` and serve that model")
        if isinstance(config, LoraConfig):
            return self._lora_deltas(config, state, name)
        if isinstance(config, IA3Config):
            return self._ia3_deltas(config, state, name)
        raise AdapterFormatError(
            f"adapter '{name}' is a {config.method_name} adapter; the bank serves LoRA (rsLoRA, "
            "DoRA, QLoRA) and IA3 adapters: merge other methods with `deltatune export`")

    def _lora_deltas(self, config: LoraConfig, state: dict[str, torch.Tensor],
                     name: str) -> dict[str, LayerDelta]:
        if config.bias != "none":
            raise AdapterFormatError(f"adapter '{name}' trains biases (bias={config.bias!r}), "
                                     "which cannot be switched per request: merge it with "
                                     "`deltatune export`")
        tensors = _group_by_module(state, name)
        deltas: dict[str, LayerDelta] = {}
        for module_name, parts in tensors.items():
            layer = self._base_module(module_name, name)
            if isinstance(layer, nn.Embedding) and {"lora_embedding_A", "lora_embedding_B"} <= set(parts):
                if config.use_dora:
                    raise AdapterFormatError(f"adapter '{name}': DoRA on the embedding "
                                             f"'{module_name}' is not served per row; merge it "
                                             "with `deltatune export`")
                delta = LoraEmbeddingDelta(parts["lora_embedding_A"], parts["lora_embedding_B"],
                                           config.scaling)
                _check_shape(delta.lora_embedding_A, (config.r, layer.num_embeddings), name,
                             module_name)
                _check_shape(delta.lora_embedding_B, (layer.embedding_dim, config.r), name,
                             module_name)
            elif isinstance(layer, nn.Linear) and {"lora_A.weight", "lora_B.weight"} <= set(parts):
                _check_shape(parts["lora_A.weight"], (config.r, layer.in_features), name,
                             module_name)
                _check_shape(parts["lora_B.weight"], (layer.out_features, config.r), name,
                             module_name)
                delta = LoraLinearDelta(parts["lora_A.weight"], parts["lora_B.weight"],
                                        config.scaling)
                if config.use_dora:
                    delta.dora_scale = _dora_scale(layer, delta, parts, name, module_name)
            else:
                raise AdapterFormatError(
                    f"adapter '{name}': tensors {sorted(parts)} for module '{module_name}' "
                    f"({type(layer).__name__}) are not LoRA factors the bank can serve (LoRA "
                    "on nn.Linear and nn.Embedding); merge it with `deltatune export`")
            deltas[module_name] = delta.to(_device_of(layer))
        return deltas

    def _ia3_deltas(self, config: IA3Config, state: dict[str, torch.Tensor],
                    name: str) -> dict[str, LayerDelta]:
        deltas: dict[str, LayerDelta] = {}
        for module_name, parts in _group_by_module(state, name).items():
            layer = self._base_module(module_name, name)
            if set(parts) != {"ia3_l"} or not isinstance(layer, nn.Linear):
                raise AdapterFormatError(
                    f"adapter '{name}': tensors {sorted(parts)} for module '{module_name}' "
                    f"({type(layer).__name__}) are not IA3 vectors of an nn.Linear")
            feedforward = _is_feedforward(module_name, config.feedforward_targets or [])
            size = layer.in_features if feedforward else layer.out_features
            vector = parts["ia3_l"]
            if vector.numel() != size:
                raise AdapterFormatError(
                    f"adapter '{name}': ia3_l of '{module_name}' has {vector.numel()} values but "
                    f"the layer needs {size}; the adapter was trained on another base model")
            deltas[module_name] = IA3Delta(vector.flatten(), feedforward).to(_device_of(layer))
        return deltas

    def _base_module(self, module_name: str, adapter: str) -> nn.Module:
        if module_name in self._layers:
            return self._layers[module_name].base_layer
        try:
            layer = self.model.get_submodule(module_name)
        except AttributeError:
            raise AdapterFormatError(
                f"adapter '{adapter}' targets module '{module_name}', which this base model "
                "does not have; it was trained on another model") from None
        return layer

    def _wrap(self, module_name: str) -> None:
        if module_name in self._layers:
            return
        layer = self.model.get_submodule(module_name)
        routed_class = RoutedEmbedding if isinstance(layer, nn.Embedding) else RoutedLinear
        routed = routed_class(layer, self)
        replace_module(self.model, module_name, routed)
        self._layers[module_name] = routed

    # -- lifecycle ---------------------------------------------------------------------------
    def unload(self, name: str) -> None:
        """Removes the adapter (its deltas leave every layer; the wrappers stay, empty)."""
        self._get(name)
        if self._merged is not None and self._merged[0] == name:
            self.unmerge()
        for layer in self._layers.values():
            layer.deltas.pop(name, None)
        del self._adapters[name]
        if self._default == name:
            self._default = None

    def offload(self, name: str, to: str = "disk") -> None:
        """Frees the adapter's memory: "disk" drops its tensors (the folder is read again on
        `restore` or on next use; adapters added from memory cannot), "cpu" moves them to
        host memory (a GPU model keeps serving the others)."""
        adapter = self._get(name)
        if self._merged is not None and self._merged[0] == name:
            raise ConfigError(f"adapter '{name}' is merged into the base; unmerge it first")
        if to == "cpu":
            adapter.deltas = {m: d.to(torch.device("cpu")) for m, d in self._resident(name).items()}
            adapter.offloaded_to_cpu = True
        elif to == "disk":
            if adapter.info.path is None:
                raise ConfigError(f"adapter '{name}' was added from memory and has no folder to "
                                  "reload from; save it with save_adapter and load that folder")
            adapter.deltas = None
        else:
            raise ConfigError(f"offload to {to!r}: use 'disk' or 'cpu'")
        for layer in self._layers.values():
            layer.deltas.pop(name, None)
        adapter.info.resident = False

    def restore(self, name: str) -> None:
        """Brings an offloaded adapter back onto the layers (re-reading its folder if needed)."""
        adapter = self._get(name)
        if adapter.info.resident:
            return
        deltas = adapter.deltas
        if deltas is None:
            state = read_adapter_weights(Path(adapter.info.path) / WEIGHTS_NAME)
            deltas = self._build_deltas(adapter.config, state, name)
        for module_name, delta in deltas.items():
            layer = self._layers[module_name]
            layer.deltas[name] = delta.to(_device_of(layer.base_layer))
        adapter.deltas = {m: self._layers[m].deltas[name] for m in deltas}
        adapter.offloaded_to_cpu = False
        adapter.info.resident = True

    def _resident(self, name: str) -> dict[str, LayerDelta]:
        return {m: layer.deltas[name] for m, layer in self._layers.items() if name in layer.deltas}

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise ConfigError(f"no adapter named '{name}' is loaded; loaded: {self.names()}")
        return self._adapters[name]

    def names(self) -> list[str]:
        return list(self._adapters)

    def info(self) -> list[AdapterInfo]:
        return [adapter.info for adapter in self._adapters.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    # -- routing -----------------------------------------------------------------------------
    def activate(self, name: str | None) -> None:
        """Makes `name` the adapter of whole batches run outside `route` (None: the base)."""
        if name is not None:
            self._get(name)
            self.restore(name)
        self._default = name
        self.routing = self._routing_for_all(name)

    @property
    def active(self) -> str | None:
        return self._default

    def _routing_for_all(self, name: str | None) -> Routing:
        return Routing(groups=[] if name is None else [(name, None)])

    @contextmanager
    def route(self, adapters: Sequence[str | None]) -> Iterator[Routing]:
        """Inside the block, row i of every batch uses `adapters[i]` (None: the base model).
        Offloaded adapters are brought back first."""
        routing = self.routing_for(adapters)
        previous = self.routing
        self.routing = routing
        try:
            yield routing
        finally:
            self.routing = previous

    def routing_for(self, adapters: Sequence[str | None]) -> Routing:
        names = list(dict.fromkeys(a for a in adapters if a is not None))
        merged = self._merged[0] if self._merged is not None else None
        for name in names:
            self._get(name)
            if merged is not None:
                raise ConfigError(f"adapter '{merged}' is merged into the base: route only to "
                                  "the base (None) until unmerge()")
            self.restore(name)
        if len(names) == 1 and all(a == names[0] for a in adapters):
            return Routing(groups=[(names[0], None)], batch_size=len(adapters))
        device = _device_of(self.model)
        groups = [(name, _row_selector([i for i, a in enumerate(adapters) if a == name], device))
                  for name in names]
        return Routing(groups=groups, batch_size=len(adapters))

    # -- merging (the swap policy) -----------------------------------------------------------
    def merge(self, name: str) -> float:
        """Folds adapter `name` into the base weights (unmerging another one first); returns
        the seconds it took. While merged, route every row to None."""
        if self._merged is not None:
            if self._merged[0] == name:
                return 0.0
            self.unmerge()
        start = time.perf_counter()
        self.restore(name)
        originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for module_name, delta in self._resident(name).items():
                base = self._layers[module_name].base_layer
                originals[module_name] = (base.weight, getattr(base, "bias", None))
                base.weight = nn.Parameter(delta.merged_weight(base), requires_grad=False)
                if isinstance(delta, IA3Delta) and base.bias is not None:
                    base.bias = nn.Parameter(delta.merged_bias(base), requires_grad=False)
        self._merged = (name, originals)
        self.routing = Routing()
        return time.perf_counter() - start

    def unmerge(self) -> None:
        """Puts the original base weights back (the same tensors, so exactly)."""
        if self._merged is None:
            return
        for module_name, (weight, bias) in self._merged[1].items():
            base = self._layers[module_name].base_layer
            base.weight = weight
            if bias is not None:
                base.bias = bias
        self._merged = None
        self.routing = self._routing_for_all(self._default)

    @property
    def merged_adapter(self) -> str | None:
        return None if self._merged is None else self._merged[0]


def _row_selector(indices: list[int], device: torch.device) -> torch.Tensor | slice:
    """A slice when the rows are one contiguous run (views, no gathering), else an index."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return torch.tensor(indices, dtype=torch.long, device=device)


def _group_by_module(state: dict[str, torch.Tensor], adapter: str
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT keys `base_model.model.<module>.<tensor>` grouped by module."""
    known = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
             "lora_magnitude_vector", "ia3_l")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        plain = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        plain = plain.replace(".default.", ".")
        suffix = next((k for k in known if plain.endswith("." + k)), None)
        if suffix is None:
            raise AdapterFormatError(
                f"adapter '{adapter}' holds tensor '{key}', which is not a LoRA factor or an "
                "IA3 vector (a trained bias or whole module?); merge it with `deltatune export`")
        grouped.setdefault(plain[:-len(suffix) - 1], {})[suffix] = tensor
    return grouped


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], adapter: str,
                 module_name: str) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterFormatError(
            f"adapter '{adapter}': a tensor of '{module_name}' has shape {tuple(tensor.shape)} "
            f"but this base needs {shape}; the adapter was trained on another base model or "
            "its config's rank is wrong")


def _dora_scale(layer: nn.Linear, delta: LoraLinearDelta, parts: dict[str, torch.Tensor],
                adapter: str, module_name: str) -> torch.Tensor:
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is None:
        raise AdapterFormatError(f"adapter '{adapter}' is DoRA but has no "
                                 f"lora_magnitude_vector for '{module_name}'")
    with torch.no_grad():
        weight = base_weight(layer).to(delta.lora_A.dtype)
        norm = torch.linalg.norm(weight + (delta.lora_B @ delta.lora_A) * delta.scaling, dim=1)
    return magnitude.flatten() / norm


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


__all__ = ["AdapterBank", "AdapterInfo", "Routing", "RoutedLinear", "RoutedEmbedding",
           "LoraLinearDelta", "LoraEmbeddingDelta", "IA3Delta"]
