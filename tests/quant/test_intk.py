"""Integer formats and bit packing: values already on a format's grid survive a round trip
exactly, errors stay within half a quantization step, packed storage has the expected byte count,
names parse (any group size) and refuse what is not a format, int8 and asymmetric int4 feed
torch's int8/int4 kernels directly, and on real weights the reconstruction error orders
int8 < int4-g128 < int2-g64 with NF4 below int4-g128 (the QLoRA paper's finding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError
from deltatune.quant import packing
from deltatune.quant.formats import FORMAT_NAMES, get_format
from tests.quant import real_weights


def relative_error(name: str, weight: torch.Tensor) -> float:
    fmt = get_format(name)
    dense = fmt.dequantize(fmt.quantize(weight), tuple(weight.shape), torch.float32)
    return ((dense - weight).norm() / weight.norm()).item()


def round_trip(name: str, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
    fmt = get_format(name)
    parts = fmt.quantize(weight)
    return parts, fmt.dequantize(parts, tuple(weight.shape), dtype)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("count", [1, 7, 8, 64, 101])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    torch.manual_seed(count)
    codes = torch.randint(0, 1 << bits, (3, count), dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, packing.packed_length(count, bits))
    assert packed.shape[1] == -(-count * bits // 8)
    assert torch.equal(packing.unpack(packed, bits, count), codes)


def test_first_code_takes_the_most_significant_bits() -> None:
    assert packing.pack(torch.tensor([[1, 2]]), 4).tolist() == [[0x12]]
    assert packing.pack(torch.tensor([[3, 0, 1, 2]]), 2).tolist() == [[0b11000110]]
    assert packing.pack(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]]), 1).tolist() == [[0b10000001]]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_byte_table_lookup_equals_unpacked_levels(bits: int) -> None:
    levels = tuple(float(3 * code - 5) for code in range(1 << bits))
    codes = torch.randint(0, 1 << bits, (5, 48), dtype=torch.uint8)
    table = packing.byte_table(levels, bits, codes.device)
    expected = torch.tensor(levels)[codes.long()]
    assert torch.equal(packing.lookup(table, packing.pack(codes, bits)), expected)


# ---------------------------------------------------------------- exact on the grid

def dyadic_scales(rows: int, groups: int) -> torch.Tensor:
    # powers of two keep every product and sum below exact in fp32
    return 2.0 ** -torch.randint(4, 9, (rows, groups)).float()


def test_int8_round_trip_on_grid() -> None:
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (16, 96))
    codes[:, 0] = 127  # every row reaches the grid's end, so absmax / 127 is the scale
    weight = codes * dyadic_scales(16, 1)
    parts, dense = round_trip("int8", weight)
    assert torch.equal(dense, weight)
    assert torch.equal(parts["codes"], codes.to(torch.int8))


def grid_weight(bits: int, group: int, symmetric: bool, rows: int = 8, columns: int = 256):
    codes = torch.randint(0, 1 << bits, (rows, columns // group, group))
    codes[..., 0], codes[..., 1] = 0, (1 << bits) - 1  # both ends used in every group
    scales = dyadic_scales(rows, columns // group)[..., None]
    mid = 1 << (bits - 1)
    low = 0.0 if symmetric else -0.25 * torch.randint(0, 4, (rows, columns // group, 1))
    return ((codes - mid) * scales + (0.0 if symmetric else low + mid * scales)).view(rows, -1)


@pytest.mark.parametrize("name,bits,group,symmetric", [
    ("int4-g128", 4, 128, True), ("int4-g32", 4, 32, True), ("int4-g128-asym", 4, 128, False),
    ("int4-g64-asym", 4, 64, False), ("int2-g64", 2, 64, False), ("int2-g16", 2, 16, False)])
def test_group_formats_round_trip_on_grid(name: str, bits: int, group: int,
                                          symmetric: bool) -> None:
    torch.manual_seed(group + bits)
    weight = grid_weight(bits, group, symmetric)
    _, dense = round_trip(name, weight)
    assert torch.equal(dense, weight)


def test_int1_round_trip_on_grid() -> None:
    torch.manual_seed(1)
    signs = torch.randint(0, 2, (8, 4, 64)) * 2 - 1
    weight = (signs * dyadic_scales(8, 4)[..., None]).view(8, 256)
    _, dense = round_trip("int1-g64", weight)
    assert torch.equal(dense, weight)


def test_ternary_round_trip_on_grid() -> None:
    torch.manual_seed(2)
    weight = (torch.randint(0, 2, (8, 100)) * 2 - 1) * 0.125  # absmean is exactly 0.125
    parts, dense = round_trip("ternary", weight)
    assert torch.equal(dense, weight) and parts["scales"].item() == 0.125


# ---------------------------------------------------------------- error bounds

def test_int8_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(3)
    weight = torch.randn(64, 200) * torch.rand(64, 1)
    parts, dense = round_trip("int8", weight)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(parts["scales"], step[:, 0])
    assert ((dense - weight).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("name,group,levels", [("int4-g128", 128, 15), ("int4-g32", 32, 15),
                                                ("int4-g128-asym", 128, 15),
                                                ("int2-g64", 64, 3)])
def test_group_error_is_at_most_half_a_step(name: str, group: int, levels: int) -> None:
    torch.manual_seed(4)
    weight = torch.randn(32, 512) * 0.05
    groups = weight.view(32, -1, group)
    parts, dense = round_trip(name, weight)
    if name.endswith("-asym") or name.startswith("int2"):
        step = (groups.amax(2) - groups.amin(2)) / levels
    else:  # symmetric: the smallest step of the grid [-8, 7] covering the group
        step = torch.maximum(groups.amax(2) / 7, -groups.amin(2) / 8)
    assert torch.allclose(parts["scales"], step)
    error = (dense - weight).abs().view(32, -1, group)
    assert (error <= step[..., None] / 2 * (1 + 1e-4) + 1e-7).all()


def test_symmetric_int4_is_finer_than_absmax_over_7() -> None:
    weight = torch.tensor([[-0.8] + [0.1] * 127])  # negative side is the larger one
    parts, dense = round_trip("int4-g128", weight)
    assert parts["scales"].item() == pytest.approx(0.1)  # 0.8 / 8, not 0.8 / 7
    assert dense[0, 0].item() == pytest.approx(-0.8)


def test_int1_scale_is_mean_absolute_value_and_signs_are_kept() -> None:
    torch.manual_seed(5)
    weight = torch.randn(16, 128)
    parts, dense = round_trip("int1-g64", weight)
    expected = weight.abs().view(16, 2, 64).mean(2)
    assert torch.allclose(parts["scales"], expected)
    assert torch.equal(dense.sign(), torch.where(weight >= 0, 1.0, -1.0))


def test_ternary_is_bitnet_absmean() -> None:
    torch.manual_seed(6)
    weight = torch.randn(32, 64)
    gamma = weight.abs().mean()
    parts, dense = round_trip("ternary", weight)
    assert torch.allclose(parts["scales"], gamma)
    assert torch.equal(dense, torch.clamp(torch.round(weight / gamma), -1, 1) * gamma)
    row_parts, row_dense = round_trip("ternary-row", weight)
    assert row_parts["scales"].shape == (32, 1)
    assert torch.allclose(row_parts["scales"], weight.abs().mean(1, keepdim=True))


# ---------------------------------------------------------------- storage

@pytest.mark.parametrize("name,expected", [
    ("int8", 96 * 512 + 96 * 4),
    ("int4-g128", 96 * 512 // 2 + 96 * 4 * 4),
    ("int4-g128-asym", 96 * 512 // 2 + 2 * 96 * 4 * 4),
    ("int2-g64", 96 * 512 // 4 + 2 * 96 * 8 * 4),
    ("int1-g64", 96 * 512 // 8 + 96 * 8 * 4),
    ("ternary", 96 * 512 // 4 + 4),
    ("nf4", 96 * 512 // 2 + 768 + 3 * 4 + 4)])
def test_storage_bytes(name: str, expected: int) -> None:
    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(96, 512))
    assert fmt.storage_bytes(parts) == expected
    assert all(type(part) is torch.Tensor and not part.requires_grad for part in parts.values())
    assert next(p for k, p in parts.items() if k == "codes").dtype in (torch.uint8, torch.int8)


# ---------------------------------------------------------------- shapes, dtypes, names

@pytest.mark.parametrize("name", FORMAT_NAMES + ("int4-g32", "int2-g128", "ternary-row"))
def test_in_features_not_a_multiple_of_the_group(name: str) -> None:
    torch.manual_seed(7)
    weight = torch.randn(6, 100).bfloat16()
    fmt = get_format(name)
    parts = fmt.quantize(weight)
    for dtype in (torch.float32, torch.bfloat16):
        dense = fmt.dequantize(parts, (6, 100), dtype)
        assert dense.shape == (6, 100) and dense.dtype == dtype and dense.is_contiguous()
    # the padded tail does not change the last group's scale: same as quantizing it alone
    if "-g" in name:
        group = int(name.split("-g")[1].split("-")[0])
        tail = weight[:, (100 // group) * group:]  # 100 is a multiple of none of the groups
        if name.startswith("int1"):  # mean |w| over the real values only
            expected = tail.float().abs().mean(1)
        else:  # extrema-based: tiling the tail into a full group keeps its min and max
            expected = fmt.quantize(torch.cat([tail] * group, dim=1)[:, :group])["scales"][:, 0]
        assert torch.allclose(parts["scales"][:, -1], expected)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_bf16_output_is_fp32_result_rounded_once(name: str) -> None:
    torch.manual_seed(8)
    fmt = get_format(name)
    parts = fmt.quantize(torch.randn(48, 256) * 0.02)
    fp32 = fmt.dequantize(parts, (48, 256), torch.float32)
    assert torch.equal(fmt.dequantize(parts, (48, 256), torch.bfloat16), fp32.bfloat16())


@pytest.mark.parametrize("name,canonical,bits", [
    ("nf4", "nf4", 4), ("int8", "int8", 8), ("int4-g128", "int4-g128", 4),
    ("INT4-G32-ASYM", "int4-g32-asym", 4), ("int2-g128", "int2-g128", 2),
    ("int2-g64-asym", "int2-g64", 2), ("int1-g16", "int1-g16", 1), ("ternary", "ternary", 2)])
def test_names_parse(name: str, canonical: str, bits: int) -> None:
    fmt = get_format(name)
    assert fmt.name == canonical and fmt.bits == bits
    assert get_format(fmt.config()["name"]) == fmt


@pytest.mark.parametrize("name", ["int3-g64", "int4", "int4-g0", "int1-g64-asym", "fp8", ""])
def test_unknown_names_list_the_valid_ones(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        get_format(name)
    if name not in ("int4-g0", "int1-g64-asym"):
        assert all(valid in str(error.value) for valid in FORMAT_NAMES)


def test_config_is_json_able_and_rebuilds_every_standard_format() -> None:
    import json
    for name in FORMAT_NAMES:
        config = json.loads(json.dumps(get_format(name).config()))
        assert config["name"] == name and get_format(config["name"]).config() == config


# ---------------------------------------------------------------- torch kernels take the parts

def test_int8_parts_are_weight_int8pack_mm_operands() -> None:
    torch.manual_seed(9)
    weight, x = torch.randn(64, 128) * 0.05, torch.randn(5, 128)
    fmt = get_format("int8")
    parts = fmt.quantize(weight)
    out = torch.ops.aten._weight_int8pack_mm(x, parts["codes"], parts["scales"])
    expected = F.linear(x, fmt.dequantize(parts, (64, 128), torch.float32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_asymmetric_int4_is_what_tinygemm_computes() -> None:
    torch.manual_seed(10)
    weight, x = torch.randn(64, 256) * 0.05, torch.randn(5, 256)
    fmt = get_format("int4-g128-asym")
    parts = fmt.quantize(weight)
    codes = packing.unpack(parts["codes"], 4, 256).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_and_zeros = torch.stack([parts["scales"].t(), parts["zeros"].t()], -1).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, scales_and_zeros)
    expected = F.linear(x, fmt.dequantize(parts, (64, 256), torch.float32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- real weights

@pytest.mark.integration
@pytest.mark.parametrize("model", ["smollm2-135m", "minilm-l6"])
def test_error_ordering_on_real_weights(model: str) -> None:
    for name, weight in real_weights(model).items():
        errors = {fmt: relative_error(fmt, weight)
                  for fmt in ("int8", "int4-g128", "int2-g64", "nf4")}
        assert errors["int8"] < errors["int4-g128"] < errors["int2-g64"], (name, errors)
        assert errors["nf4"] < errors["int4-g128"], (name, errors)  # QLoRA's NF4 finding
        assert errors["int8"] < 0.02 and errors["int2-g64"] < 0.7, (name, errors)
