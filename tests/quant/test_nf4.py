"""NF4 with double quantization is bit-identical to bitsandbytes' CPU `quantize_4bit` /
`dequantize_4bit` (packed bytes, absmax codes, second-level absmax, offset and dense values) on
real SmolLM2 weights and on random ones, and a bitsandbytes `Linear4bit` computes the same
output as `F.linear` on our dequantized weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError
from deltatune.quant import nf4
from deltatune.quant.formats import get_format
from tests.quant import real_weights

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference; "
                          "pip install bitsandbytes to run the bit-exactness tests")
import bitsandbytes.functional as bnb_functional  # noqa: E402


def bnb_nf4(weight: torch.Tensor, double_quant: bool = True):
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                 compress_statistics=double_quant)
    return packed, state


def bnb_dequantize(packed, state, dtype: torch.dtype) -> torch.Tensor:
    state.dtype = dtype
    return bnb_functional.dequantize_4bit(packed, state, quant_type="nf4")


def assert_parts_equal_bnb(weight: torch.Tensor) -> None:
    fmt = get_format("nf4")
    parts = fmt.quantize(weight)
    packed, state = bnb_nf4(weight)
    assert torch.equal(parts["codes"], packed.view(-1))
    assert torch.equal(parts["absmax_codes"], state.absmax)
    assert torch.equal(parts["absmax_scales"], state.state2.absmax)
    assert torch.equal(parts["absmax_offset"], state.offset)
    for dtype in (torch.float32, torch.bfloat16):
        ours = fmt.dequantize(parts, tuple(weight.shape), dtype)
        assert ours.dtype == dtype and ours.shape == weight.shape
        assert torch.equal(ours, bnb_dequantize(packed, state, dtype).view(weight.shape))


def test_dynamic_map_is_bitsandbytes_signed_dynamic_map() -> None:
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


def test_levels_are_bitsandbytes_nf4_levels() -> None:
    reference = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert torch.equal(nf4._nf4_levels(torch.device("cpu")), reference)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["q_proj", "gate_proj", "down_proj"])
def test_bit_exact_on_real_smollm2_weights(name: str) -> None:
    assert_parts_equal_bnb(real_weights()[name])


@pytest.mark.parametrize("shape", [(64, 128), (100, 64), (37, 100), (3, 7), (1, 1), (300, 256)])
def test_bit_exact_on_random_weights(shape: tuple[int, int]) -> None:
    # Includes element counts that are not a multiple of 64 (the last block is partial) and odd
    # ones (the last byte holds one code); in_features 100 and 7 are not multiples of 16, so
    # bnb's dequantize takes its flat-block path there (see the 16-multiple test below).
    torch.manual_seed(shape[0] * 1000 + shape[1])
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 0.1
    assert_parts_equal_bnb(weight)


def test_bit_exact_with_zero_blocks_and_outliers() -> None:
    torch.manual_seed(1)
    weight = torch.randn(128, 128) * 0.02
    weight[:2] = 0.0           # four all-zero blocks: absmax 0, all codes at level 0
    weight[5, 3] = 4.0         # one outlier dominating its block and the absmax statistics
    assert_parts_equal_bnb(weight)


def test_bit_exact_on_bf16_weights() -> None:
    torch.manual_seed(2)
    assert_parts_equal_bnb((torch.randn(192, 320) * 0.03).bfloat16())


def test_blocks_run_across_rows_when_in_features_is_not_a_multiple_of_64() -> None:
    # bnb's AVX-512 dequantize (in_features a multiple of 16) indexes absmax per row, which is
    # wrong when rows and 64-blocks do not align; we follow the flat blocks it quantized with,
    # so the check here is against the defining formula instead of bnb's dequantize.
    torch.manual_seed(3)
    weight = torch.randn(5, 80)
    fmt = get_format("nf4")
    parts = fmt.quantize(weight)
    packed, state = bnb_nf4(weight)
    assert torch.equal(parts["codes"], packed.view(-1))
    absmax = fmt.absmax(parts)
    levels = nf4._nf4_levels(torch.device("cpu"))
    codes = torch.stack([parts["codes"] >> 4, parts["codes"] & 15], 1).view(-1).long()
    flat = levels[codes] * torch.cat([absmax.repeat_interleave(64)])[:400]
    assert torch.equal(fmt.dequantize(parts, (5, 80), torch.float32), flat.view(5, 80))


def test_without_double_quant_matches_bitsandbytes() -> None:
    torch.manual_seed(4)
    weight = torch.randn(96, 200) * 0.05
    fmt = get_format("nf4-nodq")
    parts = fmt.quantize(weight)
    packed, state = bnb_nf4(weight, double_quant=False)
    assert set(parts) == {"codes", "absmax"}
    assert torch.equal(parts["codes"], packed.view(-1))
    assert torch.equal(parts["absmax"], state.absmax)
    assert torch.equal(fmt.dequantize(parts, (96, 200), torch.float32),
                       bnb_dequantize(packed, state, torch.float32))


@pytest.mark.integration
def test_linear4bit_forward_equals_linear_on_our_dequantized_weight() -> None:
    weight = real_weights()["gate_proj"]
    torch.manual_seed(5)
    bias = torch.randn(weight.shape[0]) * 0.1
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=True,
                              compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    layer.bias.data = bias.clone()
    layer = layer.to("cpu")  # quantizes the weight
    x = torch.randn(7, weight.shape[1])
    fmt = get_format("nf4")
    dense = fmt.dequantize(fmt.quantize(weight), tuple(weight.shape), torch.float32)
    with torch.no_grad():
        expected = F.linear(x, dense, bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # and not vacuously: the weight really is quantized (NF4 error is far above the tolerance)
    assert (dense - weight).abs().max() > 1e-3


def test_storage_is_half_a_byte_per_weight_plus_statistics() -> None:
    fmt = get_format("nf4")
    parts = fmt.quantize(torch.randn(576, 1536))
    blocks = 576 * 1536 // 64
    assert parts["codes"].numel() == 576 * 1536 // 2 and parts["codes"].dtype == torch.uint8
    assert parts["absmax_codes"].shape == (blocks,) and parts["absmax_codes"].dtype == torch.uint8
    assert parts["absmax_scales"].shape == (-(-blocks // 256),)
    expected = 576 * 1536 // 2 + blocks + 4 * (-(-blocks // 256)) + 4
    assert fmt.storage_bytes(parts) == expected
    # ~4.127 bits per weight, the QLoRA paper's figure for NF4 + double quantization
    assert 4.12 < 8 * expected / (576 * 1536) < 4.13


def test_names_and_config_round_trip() -> None:
    fmt = get_format("NF4")
    assert fmt.name == "nf4" and fmt.bits == 4 and fmt.double_quant
    assert get_format(fmt.config()["name"]) == fmt
    assert get_format("nf4-nodq").name == "nf4-nodq" and not get_format("nf4-nodq").double_quant
    with pytest.raises(ConfigError, match="int4-g128-asym"):
        get_format("nf5")


def test_refuses_non_matrix_weights() -> None:
    with pytest.raises(ConfigError, match="2-D"):
        get_format("nf4").quantize(torch.randn(64))
