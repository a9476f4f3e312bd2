"""`deltatune analyze`: the SVD factors are the best rank-r approximation (exact at full rank),
energy ranks follow their definition on hand values, a LoRA extracted at full rank from a model
whose linear layers, biases and head changed reproduces that model's logits, a LoRA run's ΔW
spectrum ends at its rank, and `spectrum` / `extract-lora` run end to end on a tiny trained
classification run (files written, adapters loadable by PEFT and evaluated, mistakes refused)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deltatune.analyze.delta import RunDeltas, energy_rank, layer_kind, linear_deltas
from deltatune.analyze.extract import ExtractRequest, extract_lora, factor, lora_from_deltas
from deltatune.analyze.spectrum import SpectrumRequest, analyze_spectrum
from deltatune.errors import ConfigError
from deltatune.jobs import run_training
from deltatune.spec import parse_run_spec
from tests.conftest import tiny_bert
from tests.jobs.test_tasks import _labelled_files, bert_folder  # noqa: F401 (fixture)
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)


def test_factor_is_the_best_low_rank_approximation():
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(12, 3, generator=generator) @ torch.randn(3, 9, generator=generator)
    a, b, kept = factor(low, 3)
    torch.testing.assert_close(b @ a, low, atol=1e-5, rtol=1e-5)
    assert kept == pytest.approx(1.0)
    dense = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    a, b, kept = factor(dense, 2)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=1e-5)
    assert kept == pytest.approx(float(s[:2].pow(2).sum() / s.pow(2).sum()))
    assert a.shape == (2, 9) and b.shape == (12, 2)


def test_energy_rank_on_hand_values():
    values = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: 0.643, 0.929, 1
    assert [energy_rank(values, s) for s in (0.5, 0.9, 0.93, 0.99)] == [1, 2, 3, 3]
    assert layer_kind("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert layer_kind("classifier") == "classifier"


def _perturbed(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of `base` whose linear weights, biases and classifier changed (nothing else)."""
    import copy
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.05)
                if module.bias is not None:
                    module.bias.add_(torch.randn(module.bias.shape, generator=generator) * 0.05)
    return tuned


def test_full_rank_extraction_reproduces_the_tuned_logits():
    base = tiny_bert(num_labels=3).eval()
    tuned = _perturbed(base).eval()
    layers = linear_deltas(base, tuned, skip=["classifier"])
    assert layers and all(layer.bias is not None for layer in layers)
    deltas = RunDeltas(layers, ["classifier"], base=SimpleNamespace(model=base),
                       tuned=SimpleNamespace(model=tuned))
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = tuned(input_ids=ids).logits
        errors = []
        for rank in (1, 4, 32):  # 32: the hidden size, the full rank of every layer
            handle, kept = lora_from_deltas(deltas, rank)
            handle.model.eval()
            errors.append(float((handle.model(input_ids=ids).logits - target).abs().max()))
    assert all(value == pytest.approx(1.0) for value in kept.values())
    assert errors[2] < 1e-4, errors
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ConfigError, match="smallest changed layer allows"):
        lora_from_deltas(deltas, 33)


@pytest.fixture
def runs(bert_folder: Path, tmp_path: Path) -> dict[str, Path]:  # noqa: F811
    train, evaluation = _labelled_files(tmp_path)
    made = {}
    for name, method, options in (("full", "full", {}),
                                  ("lora", "lora", {"r": 2, "targets": ["query", "value"]})):
        spec = parse_run_spec({
            "model": str(bert_folder), "task": "classification", "method": method,
            "method_options": options, "progress": False,
            "output_dir": str(tmp_path / name),
            "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
            "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
            "eval": {"baseline": False}})
        run_training(spec)
        made[name] = tmp_path / name
    return made


def test_spectrum_of_runs(runs, tmp_path):
    summary = analyze_spectrum(SpectrumRequest(str(runs["full"]), str(tmp_path / "s"),
                                               progress=False))
    written = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    assert summary["layers"] == len(written["per_layer"]) > 0
    for layer in written["per_layer"]:
        assert 1 <= layer["rank_50"] <= layer["rank_90"] <= layer["rank_99"] <= layer["full_rank"]
    split = summary["energy_split"]
    assert sum(split[k] for k in ("linear_weights", "linear_biases", "whole_modules",
                                  "other")) == pytest.approx(1.0)
    assert split["whole_modules"] > 0  # the classifier trained
    assert (tmp_path / "s" / "spectrum.png").stat().st_size > 1000
    assert "rank 90 %" in (tmp_path / "s" / "spectrum.md").read_text()
    lora = analyze_spectrum(SpectrumRequest(str(runs["lora"]), str(tmp_path / "l"),
                                            progress=False))
    per_layer = json.loads((tmp_path / "l" / "spectrum.json").read_text())["per_layer"]
    assert {layer_kind(l["layer"]) for l in per_layer} == {"attention.self.query",
                                                           "attention.self.value"}
    assert all(l["rank_99"] <= 2 for l in per_layer), lora  # ΔW of a rank-2 LoRA


def test_extract_lora_end_to_end(runs, tmp_path):
    out = tmp_path / "x"
    summary = extract_lora(ExtractRequest(str(runs["full"]), [4, 1], str(out),
                                          references=[str(runs["lora"])], progress=False))
    assert [row["rank"] for row in summary["ranks"]] == [1, 4]
    for row in summary["ranks"]:
        assert 0 <= row["metrics"]["accuracy"] <= 1 and row["parameters"] > 0
        assert (out / row["adapter"] / "adapter_model.safetensors").is_file()
    assert summary["ranks"][0]["energy_kept_mean"] < summary["ranks"][1]["energy_kept_mean"]
    assert summary["references"][0]["method"] == "lora"
    assert (out / "metric_vs_rank.png").is_file() and (out / "extract.md").is_file()
    config = json.loads((out / "r4" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"] == ["classifier"]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from deltatune.methods.adapter_io import load_adapter
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        summary["model"], num_labels=3), str(out / "r4")).eval()
    ours = AutoModelForSequenceClassification.from_pretrained(summary["model"], num_labels=3)
    load_adapter(ours, out / "r4")
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits,
                                   ours.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="already holds files"):
        extract_lora(ExtractRequest(str(runs["full"]), [1], str(out), progress=False))
    with pytest.raises(ConfigError, match="positive integers"):
        extract_lora(ExtractRequest(str(runs["full"]), [0], str(tmp_path / "y")))
    with pytest.raises(ConfigError, match="not a run directory"):
        extract_lora(ExtractRequest(str(tmp_path), [1], str(tmp_path / "z")))


def test_cli_analyze(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "deltatune", "analyze", "spectrum",
                           str(runs["lora"]), "--out", str(tmp_path / "c"), "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "lora"
    bad = subprocess.run([sys.executable, "-m", "deltatune", "analyze", "extract-lora",
                          str(runs["full"]), "--ranks", "a,b", "--out", str(tmp_path / "d")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--ranks" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "deltatune", "analyze", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "extract-lora" in helped.stdout
