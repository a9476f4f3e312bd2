"""Model compression: structured pruning (attention heads by importance, FFN neurons, whole
layers — physically removed; see deltatune.models.structure for the surgery and
deltatune.models.pruned for the saved folder), unstructured and N:M pruning with the gradual
schedule and fixed masks as loop callbacks (saved by deltatune.models.sparse_io), and knowledge
distillation as a loss term (word level) and a data rewrite (sequence level). Names are
imported lazily so that importing the package costs nothing until a function is used."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HeadGates": "deltatune.compress.heads",
    "HeadPruningResult": "deltatune.compress.heads",
    "head_importance": "deltatune.compress.heads",
    "prune_heads": "deltatune.compress.heads",
    "NeuronPruningResult": "deltatune.compress.neurons",
    "neuron_importance": "deltatune.compress.neurons",
    "prune_neurons": "deltatune.compress.neurons",
    "LayerPruningResult": "deltatune.compress.layers",
    "block_influence": "deltatune.compress.layers",
    "loss_increase": "deltatune.compress.layers",
    "remove_layers_by": "deltatune.compress.layers",
    "magnitude_masks": "deltatune.compress.unstructured",
    "wanda_masks": "deltatune.compress.unstructured",
    "apply_masks": "deltatune.compress.unstructured",
    "sparsity_report": "deltatune.compress.unstructured",
    "prunable_linears": "deltatune.compress.unstructured",
    "masks_from_weights": "deltatune.compress.unstructured",
    "MaskKeeper": "deltatune.compress.gradual",
    "GradualPruning": "deltatune.compress.gradual",
    "cubic_sparsity": "deltatune.compress.gradual",
    "WordLevelKD": "deltatune.compress.distill",
    "TeacherCache": "deltatune.compress.distill",
    "check_same_vocabulary": "deltatune.compress.distill",
    "teacher_generations": "deltatune.compress.sequence_kd",
    "sequence_kd_records": "deltatune.compress.sequence_kd",
    "closest_candidate": "deltatune.compress.sequence_kd",
    "sentence_bleu": "deltatune.compress.sequence_kd",
    "token_f1": "deltatune.compress.sequence_kd",
    "prompt_ids_for": "deltatune.compress.sequence_kd",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltatune.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
