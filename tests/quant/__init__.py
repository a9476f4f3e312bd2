"""Tests of quantized weights. `real_weights` gives a few real linear weights of the packaged
models so number formats are checked on the distributions they will actually see: SmolLM2-135M
(the packaged GGUF is Q4_1, so its weights already lie on an asymmetric 4-bit grid in groups of
32 — good for bit-exactness, biased for error comparisons) and MiniLM-L6 (full-precision
safetensors, the fair one for reconstruction error)."""
from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def _load_real_weights(model: str) -> dict[str, torch.Tensor]:
    from deltatune.models.loading import KNOWN_MODELS
    folder = KNOWN_MODELS[model].locate()
    if folder is None:
        return {}
    if model == "minilm-l6":  # read the three tensors directly: faster than building the model
        from safetensors import safe_open
        prefix = "encoder.layer.3."
        with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
            return {name: tensors.get_tensor(prefix + key).float()
                    for name, key in [("query", "attention.self.query.weight"),          # 384x384
                                      ("intermediate", "intermediate.dense.weight"),     # 1536x384
                                      ("output", "output.dense.weight")]}                # 384x1536
    from deltatune.models import load_model
    layer = load_model(model).model.model.layers[3]
    return {"q_proj": layer.self_attn.q_proj.weight.detach().clone(),      # 576 x 576
            "gate_proj": layer.mlp.gate_proj.weight.detach().clone(),      # 1536 x 576
            "down_proj": layer.mlp.down_proj.weight.detach().clone()}      # 576 x 1536


def real_weights(model: str = "smollm2-135m") -> dict[str, torch.Tensor]:
    """Three fp32 linear weights of layer 3 of `model` ("smollm2-135m": q_proj, gate_proj,
    down_proj; "minilm-l6": query, intermediate, output); skips the test when the packaged
    model is not installed."""
    weights = _load_real_weights(model)
    if not weights:
        pytest.skip(f"the packaged {model} model is not installed")
    return weights
