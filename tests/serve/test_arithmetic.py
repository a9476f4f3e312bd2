"""Adapter arithmetic: the exact linear merge (stacked factors) equals Σ wᵢ·ΔWᵢ layer by layer
and in the model's logits, negation flips the delta, TIES and DARE follow their definitions on
hand-checked vectors, the dense path's SVD is exact when the rank allows, IA3 merges on l − 1,
the written folder loads with deltatune, PEFT and the serving bank, `deltatune merge-adapters`
works from the command line, and what cannot be merged is refused with the reason."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.methods import config_class
from deltatune.methods.adapter_io import (load_adapter, read_adapter_config,
                                          read_adapter_weights, save_adapter)
from deltatune.serve.arithmetic import (MERGE_FILE, AdapterInput, DareLinearMerge, MergeOptions,
                                        MergeRequest, TiesMerge, combine, merge_adapters)
from deltatune.serve.bank import AdapterBank
from tests.conftest import tiny_llama

ADAPTERS = {
    "qv": ("lora", {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}),
    "all_rs": ("lora", {"r": 2, "alpha": 4, "targets": ["all-linear"], "use_rslora": True}),
    "embed": ("lora", {"r": 3, "alpha": 3, "targets": ["embed_tokens", "k_proj"]}),
    "dora": ("lora", {"r": 2, "targets": ["q_proj"], "use_dora": True}),
    "ia3_a": ("ia3", {"targets": ["k_proj", "v_proj", "down_proj"],
                      "feedforward_targets": ["down_proj"]}),
    "ia3_b": ("ia3", {"targets": ["k_proj", "down_proj"], "feedforward_targets": ["down_proj"]}),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for index, (name, (method, options)) in enumerate(ADAPTERS.items()):
        model = tiny_llama()
        handle = deltatune.apply(model, config_class(method).from_options(dict(options)))
        generator = torch.Generator().manual_seed(index + 10)
        with torch.no_grad():
            for parameter in handle.trainable_parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
        folders[name] = tmp_path_factory.mktemp(name)
        save_adapter(handle, folders[name], base_model_name_or_path="tiny")
    return folders


def _input(folder: Path, weight: float = 1.0) -> AdapterInput:
    return AdapterInput(read_adapter_config(folder),
                        read_adapter_weights(folder / "adapter_model.safetensors"), weight,
                        label=str(folder))


def _deltas(config, state) -> dict[str, torch.Tensor]:
    """ΔW per module of a LoRA state (scaling·B·A)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for part in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
            if key.endswith("." + part):
                factors.setdefault(key[:-len(part) - 1], {})[part.split(".")[0][-1]] = tensor.float()
    return {module: config.scaling * (f["B"] @ f["A"]) for module, f in factors.items()}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def test_linear_merge_is_exact(dirs):
    inputs = [_input(dirs["qv"], 0.7), _input(dirs["all_rs"], -0.3), _input(dirs["embed"], 1.5)]
    result = combine(inputs, "linear")
    assert result.config.r == 4 + 2 + 3 and result.config.scaling == 1.0
    expected: dict[str, torch.Tensor] = {}
    for item in inputs:
        for module, delta in _deltas(item.config, item.state).items():
            expected[module] = expected.get(module, 0) + item.weight * delta
    merged = _deltas(result.config, result.state)
    assert set(merged) == set(expected)
    for module in expected:
        torch.testing.assert_close(merged[module], expected[module], atol=1e-6, rtol=1e-5)


def test_linear_merge_logits_equal_the_summed_weights(dirs, tmp_path):
    weights = (0.5, 2.0)
    merge_adapters(MergeRequest([str(dirs["qv"]), str(dirs["all_rs"])], str(tmp_path / "m"),
                                weights=list(weights), progress=False))
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, weight in zip(("qv", "all_rs"), weights):
            item = _input(dirs[name])
            for module, delta in _deltas(item.config, item.state).items():
                modules[module.removeprefix("base_model.model.")].weight += weight * delta
    merged_model = tiny_llama()
    load_adapter(merged_model, tmp_path / "m")
    # float32 sums taken in a different order: differences of a few 1e-5 on logits of ~1
    torch.testing.assert_close(_logits(merged_model, IDS), _logits(reference, IDS),
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(tiny_llama(), IDS), _logits(reference, IDS), atol=1e-3)


def test_negate_flips_the_delta(dirs):
    item = _input(dirs["qv"])
    negated = combine([item], "negate")
    original, flipped = _deltas(item.config, item.state), _deltas(negated.config, negated.state)
    for module in original:
        torch.testing.assert_close(flipped[module], -original[module])
    with pytest.raises(ConfigError, match="exactly one adapter"):
        combine([item, _input(dirs["all_rs"])], "negate")


def test_ties_on_a_hand_checked_example():
    first = torch.tensor([1.0, -2.0, 3.0, 0.1])
    second = torch.tensor([-1.0, -1.0, 1.0, 0.2])
    merged = TiesMerge().combine([first, second], [1.0, 1.0], MergeOptions(density=0.75),
                                 torch.Generator())
    # trimmed: [1, -2, 3, 0] and [-1, -1, 1, 0]; elected signs: [0, -, +, 0]
    torch.testing.assert_close(merged, torch.tensor([0.0, -1.5, 2.0, 0.0]))
    # "frequency" elects by count: entry 0 is a tie (0), entry 3 was trimmed in both
    by_count = TiesMerge().combine([first, second], [1.0, 1.0],
                                   MergeOptions(density=1.0, majority_sign="frequency"),
                                   torch.Generator())
    torch.testing.assert_close(by_count, torch.tensor([0.0, -1.5, 2.0, 0.15]))


def test_dare_keeps_the_expectation_and_is_seeded():
    vector = torch.full((200_000,), 2.0)
    options = MergeOptions(density=0.3, seed=1)
    dropped = DareLinearMerge().combine([vector], [1.0], options,
                                        torch.Generator().manual_seed(1))
    assert abs((dropped == 0).float().mean().item() - 0.7) < 0.01
    kept = dropped.unique().tolist()
    assert len(kept) == 2 and kept[0] == 0.0 and kept[1] == pytest.approx(2.0 / 0.3)
    assert abs(dropped.mean().item() - 2.0) < 0.05
    again = DareLinearMerge().combine([vector], [1.0], options, torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)


def test_dense_merge_factors_exactly_when_the_rank_allows(dirs):
    item = _input(dirs["qv"])
    result = combine([item], "ties", MergeOptions(density=1.0))
    assert result.config.r == 4
    original, refactored = _deltas(item.config, item.state), _deltas(result.config, result.state)
    for module in original:
        torch.testing.assert_close(refactored[module], original[module], atol=1e-5, rtol=1e-4)
    assert result.energy_summary()["min"] > 0.9999


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_dense_merges_write_loadable_adapters(dirs, tmp_path, method):
    out = tmp_path / method
    report = merge_adapters(MergeRequest([str(dirs["qv"]), str(dirs["all_rs"])], str(out),
                                         method=method, options=MergeOptions(density=0.4,
                                                                             rank=3),
                                         progress=False))
    assert report["rank"] == 3 and report["method"] == method
    assert 0 < report["energy_kept"]["min"] <= report["energy_kept"]["mean"] <= 1
    saved = json.loads((out / MERGE_FILE).read_text())
    assert saved["inputs"][0]["path"] == str(dirs["qv"]) and saved["seconds"] >= 0
    model = tiny_llama()
    load_adapter(model, out)
    assert not torch.allclose(_logits(model, IDS), _logits(tiny_llama(), IDS), atol=1e-4)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "tiny"


def test_ia3_merges_on_l_minus_one(dirs, tmp_path):
    a, b = _input(dirs["ia3_a"], 0.5), _input(dirs["ia3_b"], 2.0)
    result = combine([a, b], "linear")
    for key in result.state:
        expected = 1.0 + 0.5 * (a.state[key] - 1 if key in a.state else 0) \
            + 2.0 * (b.state[key] - 1 if key in b.state else 0)
        torch.testing.assert_close(result.state[key], expected)
    merge_adapters(MergeRequest([str(dirs["ia3_a"]), str(dirs["ia3_b"])], str(tmp_path / "ia3"),
                                weights=[0.5, 2.0], progress=False))
    bank = AdapterBank(tiny_llama())
    bank.load("merged", tmp_path / "ia3")  # the serving bank takes it like any IA3 adapter
    alone = tiny_llama()
    load_adapter(alone, tmp_path / "ia3")
    with torch.no_grad(), bank.route(["merged", "merged"]):
        served = bank.model(input_ids=IDS).logits
    torch.testing.assert_close(served, _logits(alone, IDS), atol=1e-5, rtol=1e-5)


def test_merged_file_loads_in_peft(dirs, tmp_path):
    peft = pytest.importorskip("peft")
    merge_adapters(MergeRequest([str(dirs["qv"]), str(dirs["all_rs"])], str(tmp_path / "m"),
                                method="dare_ties", options=MergeOptions(density=0.5),
                                progress=False))
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "m")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(theirs, IDS), _logits(ours, IDS), atol=1e-5, rtol=1e-5)


def test_refusals(dirs, tmp_path):
    with pytest.raises(ConfigError, match="different methods"):
        combine([_input(dirs["qv"]), _input(dirs["ia3_a"])])
    with pytest.raises(AdapterFormatError, match="DoRA"):
        combine([_input(dirs["qv"]), _input(dirs["dora"])])
    with pytest.raises(ConfigError, match="unknown merge method"):
        combine([_input(dirs["qv"])], "average")
    with pytest.raises(ConfigError, match="density"):
        MergeOptions(density=0)
    with pytest.raises(ConfigError, match="finite"):
        combine([_input(dirs["qv"], float("nan"))])
    other_base = tiny_llama()
    other_base.config.hidden_size = 32
    wide = AdapterInput(*_input(dirs["qv"]).__dict__.values())
    wide.state = {k: torch.cat([v, v], dim=1) if k.endswith("lora_A.weight") else v
                  for k, v in wide.state.items()}
    with pytest.raises(AdapterFormatError, match="different base models"):
        combine([_input(dirs["qv"]), wide])
    with pytest.raises(ConfigError, match="one weight per adapter"):
        merge_adapters(MergeRequest([str(dirs["qv"])], str(tmp_path / "x"), weights=[1, 2]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        merge_adapters(MergeRequest([str(dirs["qv"])], str(tmp_path / "full"), progress=False))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="not an adapter folder"):
        merge_adapters(MergeRequest([str(tmp_path / "full")], str(tmp_path / "y")))


def test_cli_merge_adapters(dirs, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "deltatune", "merge-adapters", str(dirs["qv"]),
                           str(dirs["all_rs"]), "--method", "ties", "--weights", "1,0.5",
                           "--density", "0.5", "--rank", "4", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "ties" and report["rank"] == 4
    assert [i["weight"] for i in report["inputs"]] == [1.0, 0.5]
    assert (out / "adapter_model.safetensors").is_file() and (out / MERGE_FILE).is_file()
    refused = subprocess.run([sys.executable, "-m", "deltatune", "merge-adapters",
                              str(dirs["qv"]), "--weights", "1,2", "--out", str(tmp_path / "z")],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "one weight per adapter" in refused.stderr
    helped = subprocess.run([sys.executable, "-m", "deltatune", "merge-adapters", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "TIES" in helped.stdout and "--density" in helped.stdout
