"""What `deltatune prune` can prune, one object per kind: how it scores and removes, how its
result is saved (physically smaller, or sparse), what keeps it pruned while healing, and its
own options. `deltatune.jobs.prune` asks these objects and never compares their names; a new
kind is one class here and one line in `PRUNERS`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError

Batches = list[dict[str, torch.Tensor]]
# Beside the weights of every pruned or distilled folder: where it came from and what was done.
PROVENANCE_FILE = "compression.json"
LossFn = Callable[[nn.Module, dict], torch.Tensor]


class Pruner:
    name: ClassVar[str] = ""
    unit: ClassVar[str] = ""              # what the amount is a fraction of (plot axis)
    saves_sparse: ClassVar[bool] = False  # zeros inside full-size weights (vs smaller weights)
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}

    def __init__(self, options: dict[str, Any] | None = None, progress: bool = True):
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(f"unknown option(s) {unknown} for pruning {self.name}; valid: "
                              f"{valid}")
        self.options = {**self.defaults, **options}
        for key, allowed in self.choices.items():
            if self.options[key] not in allowed:
                raise ConfigError(f"{self.name} pruning: {key}={self.options[key]!r}; choose "
                                  f"one of {', '.join(map(str, allowed))}")
        self.progress = progress

    def prune(self, model: nn.Module, calibration: Batches, loss_fn: LossFn,
              amount: float) -> dict[str, Any]:
        """Prunes `model` in place; returns what was removed (JSON-ready)."""
        raise NotImplementedError

    def save(self, model: nn.Module, tokenizer: Any, folder: Path, extra: dict) -> None:
        from deltatune.models.pruned import save_pruned
        save_pruned(model, tokenizer, folder, extra_json={PROVENANCE_FILE: extra})

    # The pruning happens during healing (a schedule callback), not before it.
    @property
    def prunes_while_healing(self) -> bool:
        return False

    def heal_callbacks(self, model: nn.Module, amount: float, steps: int,
                       calibration: Batches) -> list:
        """Loop callbacks that keep (or, for a schedule, do) the pruning while `model` is
        fine-tuned for `steps` steps."""
        return []

    def after_heal(self, model: nn.Module) -> None:
        """Checks the healed model still has the pruned structure."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "unit": self.unit, **self.options}


class HeadPruner(Pruner):
    """Attention heads by Michel et al.'s gate-gradient importance, removed physically. On
    grouped-query attention `gqa` says what goes: query heads evenly per KV group (default:
    finer steps) or whole KV groups (also shrinks the KV cache)."""
    name = "heads"
    unit = "attention heads"
    defaults = {"gqa": "query-heads", "iterations": 1}
    choices = {"gqa": ("query-heads", "kv-groups")}

    def prune(self, model, calibration, loss_fn, amount):
        from deltatune.compress.heads import prune_heads
        result = prune_heads(model, calibration, loss_fn, fraction=amount,
                             iterations=int(self.options["iterations"]),
                             gqa=self.options["gqa"], progress=self.progress)
        return _as_dict(result)


class NeuronPruner(Pruner):
    """FFN hidden neurons by mean |activation| or first-order Taylor (activation × gradient),
    per layer or globally, removed physically."""
    name = "neurons"
    unit = "FFN neurons"
    defaults = {"by": "gradient", "scope": "per-layer"}
    choices = {"by": ("gradient", "activation"), "scope": ("per-layer", "global")}

    def prune(self, model, calibration, loss_fn, amount):
        from deltatune.compress.neurons import prune_neurons
        result = prune_neurons(model, calibration, loss_fn, fraction=amount,
                               by=self.options["by"], scope=self.options["scope"])
        return _as_dict(result)


class LayerPruner(Pruner):
    """Whole transformer blocks: the ones whose output is most like their input (ShortGPT's
    block influence) or whose removal raises the loss least, removed physically."""
    name = "layers"
    unit = "layers"
    defaults = {"by": "block-influence"}
    choices = {"by": ("block-influence", "loss")}

    def prune(self, model, calibration, loss_fn, amount):
        from deltatune.compress.layers import remove_layers_by
        from deltatune.models.structure import transformer_blocks
        layers = len(transformer_blocks(model))
        count = max(1, round(amount * layers))
        if count >= layers:
            raise ConfigError(f"--amount {amount} would remove all {layers} layers; keep at "
                              "least one")
        result = remove_layers_by(model, calibration, count, by=self.options["by"],
                                  loss_fn=loss_fn)
        return {"layers_before": layers, **_as_dict(result)}


class UnstructuredPruner(Pruner):
    """Individual weights of the blocks' linear layers set to zero; saved in the sparse folder
    layout (bitmask + non-zero values), so bytes on disk shrink; healing keeps the zeros.
    `schedule="gradual"` prunes during healing instead: Zhu & Gupta's cubic schedule from 0 to
    the amount over the first 3/4 of the heal steps, masks updated every tenth of them."""
    unit = "weights"
    saves_sparse = True
    defaults = {"scope": "local", "pattern": None, "schedule": "one-shot"}
    choices = {"scope": ("local", "global"), "schedule": ("one-shot", "gradual")}

    @property
    def prunes_while_healing(self) -> bool:
        return self.options["schedule"] == "gradual"

    def masks(self, model: nn.Module, calibration: Batches, amount: float) -> dict:
        raise NotImplementedError

    def prune(self, model, calibration, loss_fn, amount):
        from deltatune.compress.unstructured import apply_masks, sparsity_report
        if self.prunes_while_healing:
            if self.options["pattern"]:
                raise ConfigError("--schedule gradual prunes to a sparsity, not an N:M "
                                  "pattern; drop --pattern or use the one-shot schedule")
            return {"target_sparsity": amount, "schedule": "gradual",
                    "note": "pruned while healing"}
        masks = self.masks(model, calibration, amount)
        apply_masks(model, masks)
        report = sparsity_report(model, masks)
        return {"target_sparsity": amount, **_overall(report)}

    def save(self, model, tokenizer, folder, extra):
        from deltatune.models.sparse_io import save_sparse
        save_sparse(model, tokenizer, folder, extra_json={PROVENANCE_FILE: extra})

    def heal_callbacks(self, model, amount, steps, calibration):
        from deltatune.compress.gradual import GradualPruning, MaskKeeper
        from deltatune.compress.unstructured import masks_from_weights
        if not self.prunes_while_healing:
            return [MaskKeeper(model, masks_from_weights(model))]
        return [GradualPruning(model, amount, start_step=0, end_step=max(1, steps * 3 // 4),
                               every=max(1, steps // 10), method=self.name,
                               scope=self.options.get("scope", "local"),
                               batches_for_wanda=calibration if self.name == "wanda" else None)]


class MagnitudePruner(UnstructuredPruner):
    name = "magnitude"

    def masks(self, model, calibration, amount):
        from deltatune.compress.unstructured import magnitude_masks
        return magnitude_masks(model, amount, scope=self.options["scope"],
                               pattern=self.options["pattern"])


class WandaPruner(UnstructuredPruner):
    """Wanda (Sun et al. 2023): |weight| × the L2 norm of its input feature on the calibration
    sample, compared within each output row (so `scope` is always per row)."""
    name = "wanda"
    defaults = {"pattern": None, "schedule": "one-shot"}
    choices = {"schedule": ("one-shot", "gradual")}

    def masks(self, model, calibration, amount):
        from deltatune.compress.unstructured import wanda_masks
        return wanda_masks(model, calibration, amount, pattern=self.options["pattern"],
                           progress=self.progress)


PRUNERS: dict[str, type[Pruner]] = {
    cls.name: cls for cls in (HeadPruner, NeuronPruner, LayerPruner, MagnitudePruner,
                              WandaPruner)}


def get_pruner(name: str, options: dict[str, Any] | None = None,
               progress: bool = True) -> Pruner:
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruning kind {name!r}; choose one of "
                          f"{', '.join(sorted(PRUNERS))}")
    return PRUNERS[name](options, progress)


def _overall(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not isinstance(v, (dict, list))}


def _as_dict(result: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass
    data = asdict(result) if is_dataclass(result) else dict(result)
    return {str(k): _plain(v) for k, v in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
