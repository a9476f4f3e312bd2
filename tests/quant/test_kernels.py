"""Inference kernels: every candidate kernel computes F.linear(x, dequantized weight, bias) to
its stated tolerance (fp32 ones to float rounding, bf16 ones to bf16 rounding) for every format,
odd shapes and 1 / few / many tokens; the choice is measured once per (format, shape, token
bucket, dtype), remembered and reported by `kernel_choices()`, and results come back in x's
dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.quant import kernels
from deltatune.quant.formats import FORMAT_NAMES, get_format


@pytest.fixture(autouse=True)
def fresh_choices():
    kernels.reset_kernel_choices()
    yield
    kernels.reset_kernel_choices()


def reference(x, fmt, parts, shape, bias):
    dense = fmt.dequantize(parts, shape, torch.float32)
    return F.linear(x.float(), dense, None if bias is None else bias.float())


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", FORMAT_NAMES + ("int4-g32", "int4-g64-asym", "nf4-nodq"))
@pytest.mark.parametrize("shape", [(64, 256), (48, 200)])  # 200: padded last group
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_every_candidate_matches_dequantize_fp32(name: str, shape: tuple[int, int],
                                                 tokens: int) -> None:
    torch.manual_seed(tokens)
    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(shape) * 0.05)
    x, bias = torch.randn(tokens, shape[1]), torch.randn(shape[0])
    expected = reference(x, fmt, parts, shape, bias)
    names = kernels.candidates(fmt, shape, tokens)
    cache: dict = {}
    for kernel in names:
        out = kernels.run_kernel(kernel, x, fmt, parts, shape, bias, cache)
        assert out.dtype == x.dtype and out.shape == (tokens, shape[0])
        assert relative_error(out, expected) <= kernels.tolerance(kernel), kernel


def test_int_kernels_are_candidates_where_they_fit() -> None:
    int8, int4 = get_format("int8"), get_format("int4-g128-asym")
    assert "int8pack-fp32" in kernels.candidates(int8, (64, 256), 1)
    assert "int4pack-fp32" in kernels.candidates(int4, (64, 256), 1)
    assert "int4pack-fp32" in kernels.candidates(get_format("int4-g128"), (64, 256), 1)
    assert not any("int4pack" in k for k in kernels.candidates(int4, (40, 256), 1))  # N % 16
    assert not any("int4pack" in k for k in kernels.candidates(get_format("int4-g16-asym"),
                                                               (64, 256), 1))
    assert not any("pack" in k for k in kernels.candidates(get_format("nf4"), (64, 256), 1))
    if kernels.native_bf16():
        assert "int4pack-bf16" in kernels.candidates(int4, (64, 256), 300)
        assert "dequant-bf16" in kernels.candidates(int4, (64, 256), 300)


def test_choice_is_measured_once_per_bucket_and_reported() -> None:
    torch.manual_seed(0)
    fmt = get_format("int4-g128-asym")
    shape = (64, 256)
    parts = fmt.quantize(torch.randn(shape) * 0.05)
    cache: dict = {}
    for tokens in (1, 3, 7, 40):
        x = torch.randn(2, tokens, shape[1])  # leading dims are flattened into tokens
        out = kernels.quantized_linear_inference(x, fmt, parts, shape, None, torch.float32,
                                                 cache)
        assert out.shape == (2, tokens, shape[0])
        expected = reference(x, fmt, parts, shape, None)
        choice = {c["tokens"]: c for c in kernels.kernel_choices()}[
            kernels.token_bucket(2 * tokens)]
        assert relative_error(out, expected) <= kernels.tolerance(choice["kernel"])
    choices = kernels.kernel_choices()
    assert sorted(c["tokens"] for c in choices) == ["2-16", ">16"]  # 6 and 14 tokens share one
    for choice in choices:
        assert choice["kernel"] == min(choice["ms"], key=choice["ms"].get)
        assert set(choice["ms"]) == set(kernels.candidates(fmt, shape, 2 if choice["tokens"] ==
                                                           "2-16" else 80))
        assert all(ms > 0 for ms in choice["ms"].values())
    assert "int4pack-weight" in cache  # tinygemm's layout built once and kept with the weight


def test_remembered_choice_is_used_without_measuring_again(monkeypatch) -> None:
    fmt = get_format("int8")
    parts = fmt.quantize(torch.randn(32, 64))
    x = torch.randn(1, 64)
    kernels.quantized_linear_inference(x, fmt, parts, (32, 64), None, torch.float32, {})

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")
    monkeypatch.setattr(kernels, "_time_ms", no_timing)
    kernels.quantized_linear_inference(x, fmt, parts, (32, 64), None, torch.float32, {})
    assert len(kernels.kernel_choices()) == 1


def test_bf16_activations_come_back_in_bf16() -> None:
    torch.manual_seed(1)
    fmt = get_format("int4-g64-asym")
    parts = fmt.quantize(torch.randn(32, 128) * 0.05)
    x = torch.randn(4, 128).bfloat16()
    out = kernels.quantized_linear_inference(x, fmt, parts, (32, 128), None, torch.bfloat16, {})
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference(x, fmt, parts, (32, 128), None)) <= kernels.BF16_TOLERANCE


def test_cached_layouts_work_outside_inference_mode() -> None:
    # layouts built during measurement must stay usable by ordinary no-grad code
    fmt = get_format("int4-g128-asym")
    parts = fmt.quantize(torch.randn(64, 256))
    cache: dict = {}
    x = torch.randn(2, 256)
    kernels.quantized_linear_inference(x, fmt, parts, (64, 256), None, torch.float32, cache)
    assert not any(t.is_inference() for t in cache.values())
    with torch.no_grad():
        out = kernels.run_kernel("int4pack-fp32", x, fmt, parts, (64, 256), None, cache)
    assert relative_error(out, reference(x, fmt, parts, (64, 256), None)) <= 1e-5
