"""Adapter arithmetic: several saved adapters of one base combined into one ordinary adapter
file (task arithmetic, Ilharco et al. 2023): a weighted linear combination, TIES merging (Yadav
et al. 2023: trim each task vector to its largest entries, elect a sign per entry, average the
entries that agree), DARE (Yu et al. 2024: drop entries at random and rescale the rest, then
combine linearly or with TIES) and negation (subtract a task: w = -1).

What is combined is each adapter's task vector: ΔW = scaling·B·A per LoRA layer, and l − 1 per
IA3 vector (IA3 scales a weight by l, so l = 1 is "no change"). Two paths:

- exact (`linear`, `negate` on LoRA): Σ wᵢ·sᵢ·Bᵢ·Aᵢ is written as one LoRA of rank Σ rᵢ by
  stacking the factors (A's rows, B's columns with wᵢ·sᵢ folded in); nothing is approximated.
  WiSE-FT's α·ΔW on one adapter is this with one adapter and w = α.
- dense (`ties`, `dare_linear`, `dare_ties` on LoRA): each ΔW is formed, combined entry by
  entry, and the result factored back to a LoRA of rank `rank` by truncated SVD; the energy
  kept (Σ of the kept squared singular values / Σ of all) is reported per layer.

IA3 vectors are combined entry by entry on either path and written back as 1 + Σ. Adapters that
cannot be combined are refused with the reason: different methods, DoRA (its magnitude vector
is not a linear delta), trained biases or whole modules, different shapes for the same layer
(another base). Merge methods are objects in `MERGE_METHODS` (one line each), so a new rule is
a class, not a branch. `merge_adapters` reads folders and writes one; `combine` does the
arithmetic on configs and tensors in memory (e.g. for `AdapterBank.add`)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.fileio import (checked_output_folder, move_folder_into_place, write_json,
                              write_safetensors)
from deltatune.methods.adapter_io import (CONFIG_NAME, WEIGHTS_NAME, read_adapter_config,
                                          read_adapter_weights)
from deltatune.methods.base import PEFT_PREFIX, MethodConfig
from deltatune.methods.ia3 import IA3Config, _is_feedforward
from deltatune.methods.lora import LoraConfig

MERGE_FILE = "merge.json"
LORA_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
IA3_PART = "ia3_l"
SIGN_RULES = ("total", "frequency")


# -- the merge rules -----------------------------------------------------------------------------

@dataclass
class MergeOptions:
    """`density`: the fraction of each task vector's entries kept by TIES' trim or DARE's drop;
    `majority_sign`: TIES' sign election, "total" (sign of the sum) or "frequency" (the sign
    most task vectors have); `seed`: DARE's random drop; `rank`: the LoRA rank of a dense merge
    (default: the largest input rank)."""
    density: float = 0.5
    majority_sign: str = "total"
    seed: int = 0
    rank: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) \
                or not 0 < self.density <= 1:
            raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got "
                              f"{self.density!r}; TIES and DARE papers use 0.2-0.5")
        if self.majority_sign not in SIGN_RULES:
            raise ConfigError(f"majority_sign must be one of {list(SIGN_RULES)}, got "
                              f"{self.majority_sign!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")


class MergeMethod:
    """How task vectors τᵢ (same shape, fp32) and weights wᵢ become one. `exact` methods are
    linear in the τᵢ, so LoRA factors can be stacked instead of forming ΔW."""
    name: ClassVar[str]
    exact: ClassVar[bool] = False
    uses_density: ClassVar[bool] = False

    def check(self, weights: Sequence[float]) -> None:
        if not weights:
            raise ConfigError(f"merge method '{self.name}' needs at least one adapter")

    def effective_weights(self, weights: Sequence[float]) -> list[float]:
        return list(weights)

    def combine(self, vectors: list[torch.Tensor], weights: list[float], options: MergeOptions,
                generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class LinearMerge(MergeMethod):
    """Σ wᵢ·τᵢ (task arithmetic; weights 1/n give the average)."""
    name = "linear"
    exact = True

    def combine(self, vectors, weights, options, generator):
        return _weighted_sum(vectors, weights)


class NegateMerge(LinearMerge):
    """−w·τ of one adapter: the task subtracted from the base (Ilharco et al.'s forgetting by
    negation). Same as `linear` with a negative weight."""
    name = "negate"

    def check(self, weights):
        if len(weights) != 1:
            raise ConfigError(f"negate takes exactly one adapter, got {len(weights)}; to "
                              "subtract one task from another use linear with weights such "
                              "as 1,-1")

    def effective_weights(self, weights):
        return [-w for w in weights]


class TiesMerge(MergeMethod):
    """TIES: keep each wᵢ·τᵢ's top `density` entries by magnitude, elect a sign per entry, and
    average the kept entries that have the elected sign (disjoint mean)."""
    name = "ties"
    uses_density = True

    def combine(self, vectors, weights, options, generator):
        weighted = [w * _trim(v, options.density) for v, w in zip(vectors, weights)]
        return _disjoint_mean(weighted, options.majority_sign)


class DareLinearMerge(MergeMethod):
    """DARE then linear: each τᵢ keeps an entry with probability `density` (the kept ones are
    divided by it, so the expectation is τᵢ), then Σ wᵢ·τᵢ."""
    name = "dare_linear"
    uses_density = True

    def combine(self, vectors, weights, options, generator):
        return _weighted_sum([_drop_and_rescale(v, options.density, generator)
                              for v in vectors], weights)


class DareTiesMerge(MergeMethod):
    """DARE then TIES' sign election and disjoint mean (no magnitude trim: DARE has thinned)."""
    name = "dare_ties"
    uses_density = True

    def combine(self, vectors, weights, options, generator):
        weighted = [w * _drop_and_rescale(v, options.density, generator)
                    for v, w in zip(vectors, weights)]
        return _disjoint_mean(weighted, options.majority_sign)


MERGE_METHODS: dict[str, Callable[[], MergeMethod]] = {
    "linear": LinearMerge, "negate": NegateMerge, "ties": TiesMerge,
    "dare_linear": DareLinearMerge, "dare_ties": DareTiesMerge,
}


def merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {name!r}; choose one of "
                          f"{', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]()


def _weighted_sum(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0])
    for vector, weight in zip(vectors, weights):
        total.add_(vector, alpha=weight)
    return total


def _trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of entries largest in magnitude."""
    keep = max(1, round(density * vector.numel()))
    if keep >= vector.numel():
        return vector.clone()
    magnitudes = vector.abs().flatten()
    threshold = torch.topk(magnitudes, keep, sorted=False).values.min()
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def _drop_and_rescale(vector: torch.Tensor, density: float,
                      generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return vector.clone()
    keep = torch.rand(vector.shape, generator=generator) < density
    return torch.where(keep, vector / density, torch.zeros_like(vector))


def _disjoint_mean(vectors: list[torch.Tensor], sign_rule: str) -> torch.Tensor:
    stacked = torch.stack(vectors)
    if sign_rule == "total":
        elected = torch.sign(stacked.sum(dim=0))
    else:
        elected = torch.sign(torch.sign(stacked).sum(dim=0))
    agrees = (torch.sign(stacked) == elected) & (stacked != 0)
    counts = agrees.sum(dim=0).clamp(min=1)
    return (stacked * agrees).sum(dim=0) / counts


# -- adapters in memory --------------------------------------------------------------------------

@dataclass
class AdapterInput:
    """One adapter to combine: its config, PEFT-keyed tensors and weight."""
    config: MethodConfig
    state: dict[str, torch.Tensor]
    weight: float = 1.0
    label: str = "adapter"


@dataclass
class CombineResult:
    config: MethodConfig
    state: dict[str, torch.Tensor]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def energy_summary(self) -> dict[str, float] | None:
        kept = [info["energy_kept"] for info in self.layers.values() if "energy_kept" in info]
        if not kept:
            return None
        return {"mean": round(sum(kept) / len(kept), 6), "min": round(min(kept), 6)}


def combine(inputs: Sequence[AdapterInput], method: str = "linear",
            options: MergeOptions | None = None,
            progress: Callable[[int, int], None] | None = None
            ) -> CombineResult:
    """The adapters combined by `method` into one adapter (config and tensors)."""
    rule = merge_method(method)
    options = options or MergeOptions()
    weights = [_checked_weight(item) for item in inputs]
    rule.check(weights)
    weights = rule.effective_weights(weights)
    kind = _common_kind(inputs)
    grouped = [_group(item) for item in inputs]
    generator = torch.Generator().manual_seed(options.seed)
    if kind is LoraConfig:
        return _combine_lora(inputs, grouped, weights, rule, options, generator, progress)
    return _combine_ia3(inputs, grouped, weights, rule, options, generator, progress)


def _checked_weight(item: AdapterInput) -> float:
    weight = item.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight):
        raise ConfigError(f"{item.label}: the weight must be a finite number, got {weight!r}")
    return float(weight)


def _common_kind(inputs: Sequence[AdapterInput]) -> type:
    if not inputs:
        raise ConfigError("no adapters to merge: give at least one adapter folder")
    for item in inputs:
        config = item.config
        if not isinstance(config, (LoraConfig, IA3Config)):
            raise AdapterFormatError(
                f"{item.label} is a {config.method_name} adapter; adapter arithmetic combines "
                "LoRA (incl. rsLoRA and QLoRA) and IA3 adapters, whose change is a weight delta")
        if isinstance(config, LoraConfig) and config.use_dora:
            raise AdapterFormatError(
                f"{item.label} is a DoRA adapter: its magnitude vector rescales W + ΔW as a "
                "whole, so DoRA deltas do not add; merge plain LoRA adapters")
        if getattr(config, "bias", "none") != "none" or config.modules_to_save:
            raise AdapterFormatError(
                f"{item.label} also trains biases or whole modules "
                f"({config.modules_to_save or 'bias=' + config.bias}), which are not a "
                "low-rank delta; merge adapters without them")
    kinds = {type(item.config) for item in inputs}
    if len(kinds) > 1:
        raise ConfigError("the adapters use different methods "
                          f"({', '.join(sorted(i.config.method_name for i in inputs))}); "
                          "only adapters of one method can be merged")
    return kinds.pop()


def _group(item: AdapterInput) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT keys `base_model.model.<module>.<part>` grouped by module."""
    parts = [part for pair in LORA_PAIRS for part in pair] + [IA3_PART]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in item.state.items():
        plain = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        plain = plain.replace(".default.", ".")
        part = next((p for p in parts if plain.endswith("." + p)), None)
        if part is None:
            raise AdapterFormatError(f"{item.label} holds tensor '{key}', which is not a LoRA "
                                     "factor or an IA3 vector")
        grouped.setdefault(plain[:-len(part) - 1], {})[part] = tensor
    return grouped


def _lora_pair(parts: dict[str, torch.Tensor], label: str, module: str) -> tuple[str, str]:
    for pair in LORA_PAIRS:
        if set(pair) <= set(parts):
            return pair
    raise AdapterFormatError(f"{label}: module '{module}' has {sorted(parts)}, not a pair of "
                             "LoRA factors")


def _combine_lora(inputs, grouped, weights, rule, options, generator, progress) -> CombineResult:
    modules = sorted({module for groups in grouped for module in groups})
    layout = _lora_layout(inputs, grouped, modules)
    rank = sum(item.config.r for item in inputs) if rule.exact else \
        (options.rank or max(item.config.r for item in inputs))
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for index, module in enumerate(modules):
        if progress:
            progress(index + 1, len(modules))
        a_part, b_part = layout[module]["parts"]
        if rule.exact:
            a, b = _stacked_factors(inputs, grouped, weights, module, layout[module])
            info = {"rank": rank}
        else:
            deltas = [_lora_delta(item, groups, module, layout[module])
                      for item, groups in zip(inputs, grouped)]
            merged = rule.combine(deltas, weights, options, generator)
            a, b, info = _factor(merged, rank)
        dtype = layout[module]["dtype"]
        state[f"{PEFT_PREFIX}{module}.{a_part}"] = a.to(dtype).contiguous()
        state[f"{PEFT_PREFIX}{module}.{b_part}"] = b.to(dtype).contiguous()
        layers[module] = info
    config = _merged_lora_config(inputs, modules, rank)
    return CombineResult(config, state, layers)


def _lora_layout(inputs, grouped, modules) -> dict[str, dict[str, Any]]:
    """Per module: which factor names, ΔW's shape (out, in) and dtype; refuses shape clashes."""
    layout: dict[str, dict[str, Any]] = {}
    for module in modules:
        for item, groups in zip(inputs, grouped):
            if module not in groups:
                continue
            parts = _lora_pair(groups[module], item.label, module)
            a, b = groups[module][parts[0]], groups[module][parts[1]]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != item.config.r \
                    or b.shape[1] != item.config.r:
                raise AdapterFormatError(f"{item.label}: the LoRA factors of '{module}' have "
                                         f"shapes {tuple(a.shape)} and {tuple(b.shape)}, not "
                                         f"rank {item.config.r} (the config's r)")
            shape = (b.shape[0], a.shape[1])
            seen = layout.setdefault(module, {"parts": parts, "shape": shape, "dtype": a.dtype,
                                              "first": item.label})
            if seen["shape"] != shape or seen["parts"] != parts:
                raise AdapterFormatError(
                    f"{item.label} changes '{module}' as a {shape[0]}x{shape[1]} matrix but "
                    f"{seen['first']} as {seen['shape'][0]}x{seen['shape'][1]}: the adapters "
                    "were trained on different base models")
    return layout


def _stacked_factors(inputs, grouped, weights, module, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ wᵢ·sᵢ·Bᵢ·Aᵢ as [A₁; A₂; ...] and [w₁s₁B₁, w₂s₂B₂, ...] (output scaling 1); a module an
    adapter does not touch gets zero blocks so every module has the same rank."""
    out_features, in_features = layout["shape"]
    a_part, b_part = layout["parts"]
    a_blocks, b_blocks = [], []
    for item, groups, weight in zip(inputs, grouped, weights):
        r = item.config.r
        if module in groups:
            a_blocks.append(groups[module][a_part].float())
            b_blocks.append(groups[module][b_part].float() * (weight * item.config.scaling))
        else:
            a_blocks.append(torch.zeros(r, in_features))
            b_blocks.append(torch.zeros(out_features, r))
    return torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1)


def _lora_delta(item: AdapterInput, groups, module: str, layout) -> torch.Tensor:
    if module not in groups:
        return torch.zeros(layout["shape"])
    a_part, b_part = layout["parts"]
    return (groups[module][b_part].float() @ groups[module][a_part].float()) * item.config.scaling


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Truncated SVD: ΔW ≈ B·A with B = U·√S, A = √S·Vᵀ (balanced factors)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    a = root[:, None] * vh[:kept]
    b = u[:, :kept] * root[None, :]
    if kept < rank:  # a matrix smaller than the rank: pad with zero directions
        a = torch.cat([a, torch.zeros(rank - kept, a.shape[1])])
        b = torch.cat([b, torch.zeros(b.shape[0], rank - kept)], dim=1)
    energy = float((s[:kept] ** 2).sum() / (s ** 2).sum()) if s.numel() and s.sum() > 0 else 1.0
    return a, b, {"rank": rank, "energy_kept": round(energy, 6)}


def _merged_lora_config(inputs, modules: list[str], rank: int) -> LoraConfig:
    first = inputs[0].config
    same_targets = all(item.config.targets == first.targets
                       and item.config.exclude == first.exclude for item in inputs)
    targets = first.targets if same_targets else modules
    exclude = first.exclude if same_targets else []
    return dataclasses.replace(first, r=rank, alpha=float(rank), use_rslora=False,
                               use_dora=False, targets=list(targets), exclude=list(exclude),
                               dropout=0.0)


def _combine_ia3(inputs, grouped, weights, rule, options, generator, progress) -> CombineResult:
    modules = sorted({module for groups in grouped for module in groups})
    feedforward = _ia3_feedforward(inputs, grouped, modules)
    state: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        if progress:
            progress(index + 1, len(modules))
        vectors, shape, dtype = _ia3_task_vectors(inputs, grouped, module)
        merged = rule.combine(vectors, weights, options, generator)
        state[f"{PEFT_PREFIX}{module}.{IA3_PART}"] = (1.0 + merged).reshape(shape).to(dtype)
    first = inputs[0].config
    if all(i.config.targets == first.targets and i.config.exclude == first.exclude
           and i.config.feedforward_targets == first.feedforward_targets for i in inputs):
        config = first
    else:  # name every module exactly (module names match themselves)
        config = dataclasses.replace(first, targets=modules, exclude=[],
                                     feedforward_targets=sorted(feedforward))
    return CombineResult(config, state, {module: {} for module in modules})


def _ia3_feedforward(inputs, grouped, modules) -> set[str]:
    """The modules IA3 scales on the input side; refuses adapters that disagree on one."""
    roles: dict[str, tuple[bool, str]] = {}
    for item, groups in zip(inputs, grouped):
        for module in groups:
            if set(groups[module]) != {IA3_PART}:
                raise AdapterFormatError(f"{item.label}: module '{module}' has "
                                         f"{sorted(groups[module])}, not an IA3 vector")
            role = _is_feedforward(module, item.config.feedforward_targets or [])
            seen = roles.setdefault(module, (role, item.label))
            if seen[0] != role:
                raise ConfigError(f"{item.label} scales the {'input' if role else 'output'} of "
                                  f"'{module}' but {seen[1]} its "
                                  f"{'input' if seen[0] else 'output'}: IA3 adapters with "
                                  "different feedforward_targets cannot be merged")
    return {module for module in modules if roles[module][0]}


def _ia3_task_vectors(inputs, grouped, module) -> tuple[list[torch.Tensor], torch.Size,
                                                         torch.dtype]:
    present = [groups[module][IA3_PART] for groups in grouped if module in groups]
    shape, dtype = present[0].shape, present[0].dtype
    vectors = []
    for item, groups in zip(inputs, grouped):
        if module not in groups:
            vectors.append(torch.zeros(shape).flatten())
            continue
        vector = groups[module][IA3_PART]
        if vector.shape != shape:
            raise AdapterFormatError(f"{item.label}: the IA3 vector of '{module}' has shape "
                                     f"{tuple(vector.shape)}, another adapter's "
                                     f"{tuple(shape)}: trained on different base models")
        vectors.append(vector.float().flatten() - 1.0)
    return vectors, shape, dtype


# -- folders -------------------------------------------------------------------------------------

@dataclass
class MergeRequest:
    """`adapters`: adapter folders (or run directories holding `adapter/`); `weights`: one per
    adapter (default 1 each); `out`: the folder to write (refused when it holds files, unless
    `overwrite`)."""
    adapters: list[str]
    out: str
    method: str = "linear"
    weights: list[float] | None = None
    options: MergeOptions = field(default_factory=MergeOptions)
    overwrite: bool = False
    progress: bool = True


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder, or the `adapter/` folder of a `deltatune train` run directory."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "adapter" / CONFIG_NAME).is_file():
        folder = folder / "adapter"
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"'{path}' is not an adapter folder (no {CONFIG_NAME}) nor a run "
                          "directory with adapter/; pass what save_adapter, PEFT's "
                          "save_pretrained or `deltatune train` wrote")
    return folder


def merge_adapters(request: MergeRequest) -> dict[str, Any]:
    """Reads the adapters, combines them and writes the result (adapter files + merge.json)
    into `request.out`; returns the merge report."""
    start = time.perf_counter()
    rule = merge_method(request.method)
    folders = [adapter_folder(path) for path in request.adapters]
    weights = _request_weights(request, len(folders))
    out = _checked_out(request, folders)
    inputs = [AdapterInput(read_adapter_config(folder), read_adapter_weights(folder /
                                                                              WEIGHTS_NAME),
                           weight, label=f"adapter '{folder}'")
              for folder, weight in zip(folders, weights)]
    progress = _progress_bar(request.progress)
    try:
        result = combine(inputs, request.method, request.options, progress.step)
    finally:
        progress.close()
    report = _report(request, rule, folders, weights, result)
    _write(result, out, _base_model(folders[0]), report)
    report["seconds"] = round(time.perf_counter() - start, 3)
    write_json(out / MERGE_FILE, report)
    return report


def _request_weights(request: MergeRequest, count: int) -> list[float]:
    if request.weights is None:
        return [1.0] * count
    if len(request.weights) != count:
        raise ConfigError(f"{len(request.weights)} weights for {count} adapters; give one "
                          "weight per adapter, in the same order")
    return list(request.weights)


def _checked_out(request: MergeRequest, sources: list[Path]) -> Path:
    return checked_output_folder(request.out, request.overwrite, sources, "the input adapter")


def _base_model(folder: Path) -> str | None:
    raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return raw.get("base_model_name_or_path")


def _report(request, rule, folders, weights, result: CombineResult) -> dict[str, Any]:
    report: dict[str, Any] = {
        "method": rule.name, "exact": rule.exact,
        "inputs": [{"path": str(folder), "weight": weight, "base_model": _base_model(folder)}
                   for folder, weight in zip(folders, weights)],
        "adapter_method": result.config.method_name, "layers": len(result.layers),
        "parameters": sum(t.numel() for t in result.state.values()),
    }
    if isinstance(result.config, LoraConfig):
        report["rank"] = result.config.r
    if rule.uses_density:
        report["density"] = request.options.density
        report["seed"] = request.options.seed
        report["majority_sign"] = request.options.majority_sign
    energy = result.energy_summary()
    if energy:
        report["energy_kept"] = energy
        report["energy_kept_per_layer"] = {module: info["energy_kept"]
                                           for module, info in result.layers.items()}
    return report


def _write(result: CombineResult, out: Path, base_model: str | None,
           report: dict[str, Any]) -> None:
    """Writes the adapter into a hidden folder next to `out`, then renames it into place, so an
    interrupted merge leaves `out` as it was."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merge", dir=out.parent))
    try:
        folder = staging / out.name
        folder.mkdir()
        config = result.config.adapter_config()
        config["base_model_name_or_path"] = base_model
        write_safetensors(folder / WEIGHTS_NAME, result.state, metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, config)
        report["bytes"] = (folder / WEIGHTS_NAME).stat().st_size
        move_folder_into_place(folder, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _progress_bar:
    """A tqdm bar over the layers on stderr (or nothing)."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def step(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="merging layers", unit="layer")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["MERGE_METHODS", "MERGE_FILE", "MergeMethod", "MergeOptions", "MergeRequest",
           "AdapterInput", "CombineResult", "combine", "merge_adapters", "merge_method",
           "adapter_folder"]
