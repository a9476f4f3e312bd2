"""The fused gated MLP gives bit-identical outputs and gradients, stores less for backward, is
found by structure (Llama yes, BERT no) and can be switched off again."""
from __future__ import annotations

import torch

import deltatune
from deltatune.methods.lora import LoraConfig
from deltatune.train.fused_mlp import fuse_gated_mlps, unfuse_gated_mlps
from tests.conftest import random_batch, tiny_bert, tiny_llama


def _loss_grads_and_saved_bytes(fused: bool):
    model = tiny_llama()
    handle = deltatune.apply(model, LoraConfig(r=4, targets=["gate_proj", "up_proj", "q_proj"],
                                               init="gaussian"))
    # B = 0 at init would hide gradient differences through the LoRA path.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    if fused:
        assert fuse_gated_mlps(model) == 2
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        logits = model(**random_batch(length=12)).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in handle.model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, sum(saved)


def test_outputs_and_gradients_are_bit_identical_and_less_is_saved():
    plain_logits, plain_grads, plain_saved = _loss_grads_and_saved_bytes(False)
    fused_logits, fused_grads, fused_saved = _loss_grads_and_saved_bytes(True)
    assert torch.equal(fused_logits, plain_logits)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.equal(fused_grads[name], grad), name
    # Per layer and token the SiLU output (intermediate size 64) is no longer stored.
    assert plain_saved - fused_saved >= 2 * 2 * 12 * 64 * 4


def test_found_by_structure_and_removable():
    model = tiny_llama()
    assert fuse_gated_mlps(model) == 2
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    unfuse_gated_mlps(model)
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    assert fuse_gated_mlps(tiny_bert()) == 0
