"""The adapter bank: several saved adapters on one base, a mixed batch whose rows use different
adapters (and none) equal per row to each adapter applied alone with deltatune's own method
code, activation and switching, offload to disk / CPU and back, unload, merge / unmerge exactly,
the per-adapter (not per-row) work, and the refusals."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.methods import config_class
from deltatune.methods.adapter_io import load_adapter, save_adapter
from deltatune.serve.bank import AdapterBank, LoraLinearDelta
from tests.conftest import tiny_llama

ADAPTERS = {
    "qv": ("lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}),
    "all_rs": ("lora", {"r": 2, "alpha": 4, "targets": ["all-linear"], "use_rslora": True}),
    "dora": ("lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "o_proj", "up_proj"],
                      "use_dora": True}),
    "embed": ("lora", {"r": 4, "alpha": 4, "targets": ["embed_tokens", "k_proj"]}),
    "ia3": ("ia3", {"targets": ["k_proj", "v_proj", "down_proj"],
                    "feedforward_targets": ["down_proj"]}),
}


def _randomize(handle, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for index, (name, (method, options)) in enumerate(ADAPTERS.items()):
        model = tiny_llama()
        handle = deltatune.apply(model, config_class(method).from_options(dict(options)))
        _randomize(handle, seed=index + 1)
        dirs[name] = tmp_path_factory.mktemp(name)
        save_adapter(handle, dirs[name])
    return dirs


def _alone(directory: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    model = tiny_llama()
    if directory is not None:
        load_adapter(model, directory)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _bank(adapter_dirs, names=None) -> AdapterBank:
    bank = AdapterBank(tiny_llama())
    for name in names or adapter_dirs:
        bank.load(name, adapter_dirs[name])
    return bank


def _ids(batch: int, length: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_mixed_batch_equals_each_adapter_alone(adapter_dirs):
    bank = _bank(adapter_dirs)
    rows = ["qv", None, "all_rs", "dora", "embed", "ia3", "qv", None, "ia3", "dora"]
    input_ids = _ids(len(rows))
    with torch.no_grad(), bank.route(rows):
        mixed = bank.model(input_ids=input_ids).logits
    for name in set(rows):
        expected = _alone(adapter_dirs[name] if name else None, input_ids)
        for i, row in enumerate(rows):
            if row == name:
                torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)
    # the adapters really differ from the base and from each other
    base = _alone(None, input_ids)
    for i, row in enumerate(rows):
        if row is not None:
            assert (mixed[i] - base[i]).abs().max() > 1e-2


def test_rows_without_adapter_are_the_base_bit_for_bit(adapter_dirs):
    bank = _bank(adapter_dirs)
    input_ids = _ids(3)
    with torch.no_grad(), bank.route([None, "qv", None]):
        mixed = bank.model(input_ids=input_ids).logits
    with torch.no_grad():
        base = tiny_llama()(input_ids=input_ids).logits
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])


def test_activate_switches_without_touching_the_base(adapter_dirs):
    bank = _bank(adapter_dirs)
    weights_before = {n: p.clone() for n, p in bank.model.named_parameters()}
    input_ids = _ids(2)
    for name in ["qv", "ia3", "dora", None, "qv"]:
        bank.activate(name)
        assert bank.active == name
        with torch.no_grad():
            out = bank.model(input_ids=input_ids).logits
        expected = _alone(adapter_dirs[name] if name else None, input_ids)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for n, p in bank.model.named_parameters():
        assert torch.equal(p, weights_before[n]), n


def test_low_rank_work_is_per_adapter_not_per_row(adapter_dirs, monkeypatch):
    bank = _bank(adapter_dirs, ["qv"])
    calls = []
    original = LoraLinearDelta.add_to

    def counting(self, output, x, rows, base_layer):
        calls.append(rows if rows is None or isinstance(rows, slice) else rows.numel())
        return original(self, output, x, rows, base_layer)

    monkeypatch.setattr(LoraLinearDelta, "add_to", counting)
    with torch.no_grad(), bank.route(["qv"] * 2 + [None] * 3 + ["qv"] * 3):
        bank.model(input_ids=_ids(8))
    # 2 layers x (q_proj, v_proj): one call each, covering the adapter's 5 rows at once
    assert calls == [5, 5, 5, 5]
    calls.clear()
    with torch.no_grad(), bank.route([None] * 3 + ["qv"] * 5):  # a contiguous run: a view
        bank.model(input_ids=_ids(8))
    assert calls == [slice(3, 8)] * 4


def test_offload_to_disk_and_cpu_then_restore(adapter_dirs):
    bank = _bank(adapter_dirs, ["qv", "ia3"])
    input_ids = _ids(2)
    expected = _alone(adapter_dirs["qv"], input_ids)
    bank.offload("qv", to="disk")
    info = {i.name: i for i in bank.info()}
    assert not info["qv"].resident and info["ia3"].resident
    assert all("qv" not in layer.deltas for layer in bank._layers.values())
    with torch.no_grad(), bank.route(["qv", "qv"]):  # brought back on use
        torch.testing.assert_close(bank.model(input_ids=input_ids).logits, expected,
                                   atol=1e-5, rtol=1e-5)
    assert {i.name: i for i in bank.info()}["qv"].resident
    bank.offload("ia3", to="cpu")
    bank.restore("ia3")
    bank.activate("ia3")
    with torch.no_grad():
        torch.testing.assert_close(bank.model(input_ids=input_ids).logits,
                                   _alone(adapter_dirs["ia3"], input_ids), atol=1e-5, rtol=1e-5)


def test_unload_removes_the_adapter(adapter_dirs):
    bank = _bank(adapter_dirs, ["qv", "dora"])
    bank.activate("qv")
    bank.unload("qv")
    assert bank.names() == ["dora"] and bank.active is None
    with pytest.raises(ConfigError, match="no adapter named 'qv'"):
        with bank.route(["qv"]):
            pass
    with torch.no_grad():
        out = bank.model(input_ids=_ids(2)).logits
    torch.testing.assert_close(out, _alone(None, _ids(2)), atol=0, rtol=0)
    bank.load("qv", adapter_dirs["qv"])  # the name is free again
    assert "qv" in bank


@pytest.mark.parametrize("name", ["qv", "all_rs", "dora", "embed", "ia3"])
def test_merge_equals_unmerged_and_unmerge_is_exact(adapter_dirs, name):
    bank = _bank(adapter_dirs, [name])
    before = {n: p.clone() for n, p in bank.model.named_parameters()}
    input_ids = _ids(2)
    with torch.no_grad(), bank.route([name, name]):
        routed = bank.model(input_ids=input_ids).logits
    bank.merge(name)
    assert bank.merged_adapter == name
    with torch.no_grad():
        merged = bank.model(input_ids=input_ids).logits
    torch.testing.assert_close(merged, routed, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="merged into the base"):
        bank.routing_for([name])
    bank.unmerge()
    for n, p in bank.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bank_reads_peft_files(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    input_ids = _ids(2)
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
    bank = AdapterBank(model)
    bank.load("peft", tmp_path)
    with torch.no_grad(), bank.route(["peft", "peft"]):
        torch.testing.assert_close(bank.model(input_ids=input_ids).logits, expected,
                                   atol=1e-5, rtol=1e-5)


def test_refusals(adapter_dirs, tmp_path):
    bank = _bank(adapter_dirs, ["qv"])
    with pytest.raises(ConfigError, match="already loaded"):
        bank.load("qv", adapter_dirs["qv"])
    with pytest.raises(ConfigError, match="not allowed"):
        bank.load("../x", adapter_dirs["qv"])
    prefix_model = tiny_llama()
    handle = deltatune.apply(prefix_model, config_class("prefix").from_options({}))
    save_adapter(handle, tmp_path / "prefix")
    with pytest.raises(AdapterFormatError, match="LoRA .* and IA3"):
        bank.load("prefix", tmp_path / "prefix")
    bigger = tiny_llama(vocab_size=256)
    other = deltatune.apply(bigger, config_class("lora").from_options(
        {"r": 4, "targets": ["embed_tokens"]}))
    save_adapter(other, tmp_path / "other")
    with pytest.raises(AdapterFormatError, match="another base model"):
        bank.load("other", tmp_path / "other")
    with pytest.raises(ConfigError, match="offload to"):
        bank.offload("qv", to="tape")
    assert bank.names() == ["qv"]


def test_qlora_adapters_on_an_nf4_base(tmp_path):
    from deltatune.quant.model import quantize_model

    trained = tiny_llama()
    quantize_model(trained, "nf4")
    handle = deltatune.apply(trained, config_class("qlora").from_options(
        {"r": 4, "targets": ["q_proj", "down_proj"]}))
    _randomize(handle, seed=7)
    save_adapter(handle, tmp_path)
    input_ids = _ids(3)
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
    base = tiny_llama()
    quantize_model(base, "nf4")
    bank = AdapterBank(base)
    bank.load("q", tmp_path)
    with torch.no_grad(), bank.route(["q", "q", None]):
        routed = bank.model(input_ids=input_ids).logits
    torch.testing.assert_close(routed[:2], expected[:2], atol=1e-5, rtol=1e-5)
    bank.merge("q")
    with torch.no_grad():
        torch.testing.assert_close(bank.model(input_ids=input_ids).logits[:2], expected[:2],
                                   atol=1e-4, rtol=1e-4)
    bank.unmerge()
