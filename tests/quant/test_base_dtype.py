"""--base-dtype: "auto" takes bf16 only where the CPU flags say native bf16 and a measured
matmul agrees; the frozen base is cast, trainable weights stay fp32, tied weights stay tied,
and fp32 trainable layers work on bf16 activations (autocast), in training and generation."""
from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.methods import apply, make_config
from deltatune.quant import quantize_model, use_base_dtype
from deltatune.quant import precision
from deltatune.quant.precision import resolve_base_dtype
from tests.conftest import random_batch, tiny_bert, tiny_llama


@pytest.fixture(autouse=True)
def fresh_choice():
    resolve_base_dtype.cache_clear()
    yield
    resolve_base_dtype.cache_clear()


def test_auto_is_fp32_without_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    choice = resolve_base_dtype("auto")
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


def test_auto_follows_the_measurement_where_bf16_is_native(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(precision, "matmul_ms",
                        lambda dtype, **_: 10.0 if dtype == torch.float32 else 3.0)
    fast = resolve_base_dtype("auto")
    assert fast.dtype == torch.bfloat16 and fast.fp32_ms == 10.0 and fast.bf16_ms == 3.0
    resolve_base_dtype.cache_clear()
    monkeypatch.setattr(precision, "matmul_ms",
                        lambda dtype, **_: 10.0 if dtype == torch.float32 else 9.5)
    assert resolve_base_dtype("auto").dtype == torch.float32  # within the noise margin


def test_explicit_choices_and_a_wrong_name() -> None:
    assert resolve_base_dtype("fp32").dtype == torch.float32
    assert resolve_base_dtype("bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        resolve_base_dtype("fp8")


@pytest.mark.parametrize("quantized", [False, True])
def test_only_frozen_weights_are_cast_and_lora_trains_in_fp32(quantized) -> None:
    model = tiny_llama()
    if quantized:
        quantize_model(model, "nf4")
    handle = apply(model, make_config("lora", {"targets": "all-linear", "r": 4}))
    cast = use_base_dtype(model, torch.bfloat16)
    assert cast > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in handle.trainable_parameters())
    batch = random_batch()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in handle.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_bf16_base_loss_is_close_to_fp32() -> None:
    batch = random_batch()
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama()
        apply(model, make_config("lora", {"targets": "all-linear", "r": 4}))
        use_base_dtype(model, dtype)
        with torch.no_grad():
            losses.append(model(**batch, labels=batch["input_ids"]).loss.item())
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0]


def test_an_fp32_classification_head_takes_bf16_activations() -> None:
    model = tiny_bert(num_labels=3)
    handle = apply(model, make_config("lora", {"targets": ["query", "value"], "r": 4,
                                               "modules_to_save": ["classifier"]}))
    use_base_dtype(model, torch.bfloat16)
    assert model.classifier.weight.dtype == torch.float32  # trainable: stays fp32
    batch = random_batch()
    output = model(**batch, labels=torch.tensor([0, 2]))
    output.loss.backward()
    assert model.classifier.weight.grad.dtype == torch.float32
    assert len(handle.trainable_parameters()) > 0


def test_generation_runs_on_a_bf16_base() -> None:
    model = tiny_llama()
    apply(model, make_config("lora", {"targets": "all-linear", "r": 4}))
    use_base_dtype(model, torch.bfloat16)
    ids = random_batch(batch=1, length=4)["input_ids"]
    with torch.inference_mode():
        output = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                pad_token_id=0)
    assert output.shape == (1, 7)


def test_paged_8bit_adamw_is_refused_on_cpu_with_the_fix() -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import make_optimizer
    model = tiny_llama()
    handle = apply(model, make_config("lora", {"r": 4}))
    with pytest.raises(ConfigError, match="CUDA GPU.*use optimizer adamw"):
        make_optimizer(handle, TrainConfig(optimizer="paged_adamw_8bit"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes)")
def test_paged_8bit_adamw_steps_on_cuda() -> None:
    pytest.importorskip("bitsandbytes")
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import make_optimizer
    model = tiny_llama().cuda()
    handle = apply(model, make_config("lora", {"r": 4}))
    optimizer = make_optimizer(handle, TrainConfig(optimizer="paged_adamw_8bit"))
    batch = {k: v.cuda() for k, v in random_batch().items()}
    model(**batch, labels=batch["input_ids"]).loss.backward()
    before = [p.detach().clone() for p in handle.trainable_parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, handle.trainable_parameters()))
