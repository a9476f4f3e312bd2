"""The fused LoRA linear node equals the modular form (base linear + B(A(x)) * scaling) in
outputs and in every gradient, and is only used where it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.methods.lora import LoraConfig
from deltatune.methods.lora_fused import fused_lora_linear
from tests.conftest import tiny_llama


def _modular(x, weight, bias, lora_a, lora_b, scaling):
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("trainable", [("x", "a", "b"), ("a", "b"), ("x", "weight", "bias", "a")])
def test_outputs_and_gradients_equal_the_modular_form(with_bias, trainable):
    generator = torch.Generator().manual_seed(0)
    tensors = {"x": torch.randn(3, 5, 12, generator=generator, dtype=torch.float64),
               "weight": torch.randn(7, 12, generator=generator, dtype=torch.float64),
               "bias": torch.randn(7, generator=generator, dtype=torch.float64) if with_bias
               else None,
               "a": torch.randn(4, 12, generator=generator, dtype=torch.float64),
               "b": torch.randn(7, 4, generator=generator, dtype=torch.float64)}
    upstream = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    results = []
    for function in (fused_lora_linear, _modular):
        inputs = {k: None if v is None else v.clone().requires_grad_(k in trainable)
                  for k, v in tensors.items()}
        out = function(inputs["x"], inputs["weight"], inputs["bias"], inputs["a"], inputs["b"],
                       0.75)
        out.backward(upstream)
        results.append((out, {k: v.grad for k, v in inputs.items() if v is not None}))
    (fused, fused_grads), (modular, modular_grads) = results
    torch.testing.assert_close(fused, modular, rtol=0, atol=1e-12)
    for name, grad in modular_grads.items():
        if grad is None:
            assert fused_grads[name] is None, name
        else:
            torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=1e-12)


def test_lora_layers_take_the_fused_path_only_where_it_applies(monkeypatch):
    calls = []
    import deltatune.methods.lora as lora_module
    real = lora_module.fused_lora_linear
    monkeypatch.setattr(lora_module, "fused_lora_linear",
                        lambda *args: calls.append(1) or real(*args))
    ids = torch.randint(0, 128, (2, 6))
    for config, expect_fused in ((LoraConfig(r=2, targets=["q_proj"]), True),
                                 (LoraConfig(r=2, targets=["q_proj"], use_dora=True), False),
                                 (LoraConfig(r=2, targets=["q_proj"], dropout=0.1), False)):
        calls.clear()
        model = tiny_llama()
        deltatune.apply(model, config)
        model.train()
        model(input_ids=ids).logits.sum().backward()
        assert bool(calls) == expect_fused, config
