"""`deltatune prune` end to end on tiny models: every kind prunes a trained classification run
or a causal LM, measures each stage, saves a folder `load_model` reads back with the same
logits, heals as an ordinary run (LoRA, full with masks held, distill), and writes
config.json, metrics.jsonl, summary.json and curve.png; user mistakes are one ConfigError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.jobs import run_training
from deltatune.jobs.prune import HealSettings, PruneRequest, prune_saved
from deltatune.models import load_model
from deltatune.spec import parse_run_spec
from tests.jobs.test_export import base_folder  # noqa: F401 (fixture: tiny Llama + BPE)
from tests.jobs.test_tasks import _labelled_files, bert_folder  # noqa: F401 (fixture)
from tests.test_fuzz import one_thread  # noqa: F401 (autouse fixture: one torch thread)


@pytest.fixture
def classifier_run(bert_folder: Path, tmp_path: Path) -> Path:
    train, evaluation = _labelled_files(tmp_path)
    spec = parse_run_spec({
        "model": str(bert_folder), "task": "classification", "method": "full",
        "progress": False, "output_dir": str(tmp_path / "run"),
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
        "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3},
        "eval": {"baseline": False}})
    run_training(spec)
    return tmp_path / "run"


def text_file(tmp_path: Path) -> Path:
    from tests.jobs.test_export import CORPUS
    path = tmp_path / "text.txt"
    path.write_text("\n".join(CORPUS.split(". ")) + "\n")
    return path


def _request(source: str, out: Path, kind: str, amounts, **extra) -> PruneRequest:
    return PruneRequest(source=source, kind=kind, amounts=list(amounts), out=str(out),
                        calibration_examples=16, progress=False, **extra)


def test_head_sweep_on_a_run_shrinks_and_reloads(classifier_run: Path, tmp_path: Path):
    summary = prune_saved(_request(str(classifier_run), tmp_path / "p", "heads", [0.25, 0.5]))
    before = summary["unpruned"]["parameters"]
    after = [r["pruned"]["parameters"] for r in summary["results"]]
    # tiny_bert: 2 layers x 4 heads of 8 dims, hidden 32: a head is 4 x 8 x 32 + 3 x 8 biases.
    per_head = 4 * 8 * 32 + 3 * 8
    assert [before - a for a in after] == [2 * per_head, 4 * per_head]
    assert summary["metric"] == "accuracy"
    assert all(r["reload"]["reload_max_abs_logit_diff"] < 1e-5 for r in summary["results"])
    folder = tmp_path / "p" / "amount-0.50" / "pruned"
    reloaded = load_model(str(folder), task="classification")
    assert sum(p.numel() for p in reloaded.model.parameters()) == after[1]
    assert (tmp_path / "p" / "curve.png").stat().st_size > 1000
    stages = [json.loads(line)["stage"] for line in
              (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["unpruned", "pruned", "pruned"]
    assert json.loads((folder / "labels.json").read_text())["label_names"] == ["a", "b", "c"]


def test_magnitude_heal_full_keeps_the_zeros(base_folder: Path, tmp_path: Path):
    text = text_file(tmp_path)
    from deltatune.data import DataConfig
    request = _request(str(base_folder), tmp_path / "m", "magnitude", [0.5], task="text",
                       data=DataConfig(train=str(text), max_length=32),
                       heal=HealSettings(mode="full", steps=3, batch_size=2,
                                         learning_rate=1e-2))
    summary = prune_saved(request)
    result = summary["results"][0]
    assert result["details"]["target_sparsity"] == 0.5
    healed = load_model(str(tmp_path / "m" / "amount-0.50" / "healed"))
    pruned = load_model(str(tmp_path / "m" / "amount-0.50" / "pruned"))
    layer = "model.layers.0.mlp.down_proj"
    pruned_weight = dict(pruned.model.named_modules())[layer].weight
    healed_weight = dict(healed.model.named_modules())[layer].weight
    assert torch.equal(pruned_weight == 0, healed_weight == 0)   # masks held fixed
    assert not torch.equal(pruned_weight, healed_weight)         # and the rest trained
    assert result["healed"]["bytes_on_disk"] < summary["unpruned"]["parameters"] * 4


def test_layers_heal_lora_and_distill(base_folder: Path, tmp_path: Path):
    from deltatune.data import DataConfig
    data = DataConfig(train=str(text_file(tmp_path)), max_length=32)
    for mode in ("lora", "distill"):
        out = tmp_path / mode
        summary = prune_saved(_request(str(base_folder), out, "layers", [0.5], task="text",
                                       data=data, heal=HealSettings(mode=mode, steps=2,
                                                                    batch_size=2)))
        healed = summary["results"][0]["healed"]
        assert summary["results"][0]["pruned"]["parameters"] < summary["unpruned"]["parameters"]
        assert healed["parameters"] == summary["results"][0]["pruned"]["parameters"]
        reload = summary["results"][0]["reload"]
        assert reload["reload_max_abs_logit_diff"] < 1e-4
        assert isinstance(reload["sample_generation"], str)
        loaded = load_model(str(out / "amount-0.50" / "healed"))
        assert loaded.model.config.num_hidden_layers == 1
        ids = torch.tensor([[5, 6, 7]])
        assert loaded.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                                     attention_mask=torch.ones_like(ids)).shape[1] == 6
    terms = [json.loads(line) for line in
             (tmp_path / "distill" / "amount-0.50" / "heal" / "metrics.jsonl")
             .read_text().splitlines()]
    assert any("loss_kd" in record for record in terms)


def test_mistakes_are_one_config_error(classifier_run: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="heal lora cannot keep magnitude sparsity"):
        prune_saved(_request(str(classifier_run), tmp_path / "a", "magnitude", [0.5],
                             heal=HealSettings(mode="lora")))
    with pytest.raises(ConfigError, match="amounts are fractions"):
        prune_saved(_request(str(classifier_run), tmp_path / "b", "heads", [1.5]))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['gqa'\] for pruning magnitude"):
        prune_saved(_request(str(classifier_run), tmp_path / "c", "magnitude", [0.5],
                             options={"gqa": "kv-groups"}))


def test_cli_prune_prints_the_summary(classifier_run: Path, tmp_path: Path, capsys):
    code = main(["prune", str(classifier_run), "--kind", "neurons", "--amount", "0.5",
                 "--out", str(tmp_path / "n"), "--no-progress", "--calibration-examples", "8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["results"][0]["pruned"]["parameters"] < summary["unpruned"]["parameters"]
    code = main(["prune", str(classifier_run), "--kind", "neurons", "--amount", "0.5",
                 "--out", str(tmp_path / "n"), "--no-progress"])
    assert code == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_gradual_schedule_prunes_while_healing(base_folder: Path, tmp_path: Path):
    from deltatune.compress.unstructured import sparsity_report
    from deltatune.data import DataConfig
    request = _request(str(base_folder), tmp_path / "g", "wanda", [0.5], task="text",
                       data=DataConfig(train=str(text_file(tmp_path)), max_length=32),
                       options={"schedule": "gradual"},
                       heal=HealSettings(mode="full", steps=8, batch_size=2))
    summary = prune_saved(request)
    result = summary["results"][0]
    assert result["pruned"]["nonzero_parameters"] == summary["unpruned"]["nonzero_parameters"]
    schedule = result["healed"]["sparsity_schedule"]
    targets = [entry["target_sparsity"] for entry in schedule]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.5)
    healed = load_model(str(tmp_path / "g" / "amount-0.50" / "healed"))
    assert sparsity_report(healed.model)["sparsity"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="a gradual schedule prunes while healing"):
        prune_saved(_request(str(base_folder), tmp_path / "h", "magnitude", [0.5], task="text",
                             data=request.data, options={"schedule": "gradual"}))


def test_non_uniform_head_pruned_folder_takes_lora(classifier_run: Path, tmp_path: Path):
    """BERT folders with removed heads need deltatune_pruned.json; training LoRA on one (the
    heal run) and merging back keeps the per-layer shapes."""
    summary = prune_saved(_request(str(classifier_run), tmp_path / "l", "heads", [0.25],
                                   heal=HealSettings(mode="lora", steps=2, batch_size=8,
                                                     lora_rank=2)))
    result = summary["results"][0]
    assert (tmp_path / "l" / "amount-0.25" / "healed" / "deltatune_pruned.json").is_file()
    assert result["healed"]["parameters"] == result["pruned"]["parameters"]
    assert result["reload"]["reload_max_abs_logit_diff"] < 1e-5
