"""`deltatune compare` on a tiny BERT classifier: every variant is a real `deltatune train` run on
the same data and seed, with the method's learning rate; a second call retrains nothing; an
interrupted variant resumes from its checkpoint (or restarts without one); changed settings
are refused unless --overwrite; variants files are checked; `deltatune report` rebuilds the
report from run directories."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.jobs.compare import (DEFAULT_LEARNING_RATES, CompareRequest, Variant,
                                    plan_comparison, read_variants_file, run_comparison,
                                    variants_from_methods)
from tests.report.conftest import STEPS


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_compare_trains_each_method_on_the_same_data(two_method_comparison):
    request, result = two_method_comparison
    out = Path(request.out)
    assert result.trained == ["lora", "full"]
    lora, full = _summary(out / "runs/lora"), _summary(out / "runs/full")
    assert (lora["method"], full["method"]) == ("lora", "full")
    assert lora["steps"] == full["steps"] == STEPS
    assert lora["data"]["train_examples"] == full["data"]["train_examples"] == 48
    assert lora["data"]["eval_examples"] == full["data"]["eval_examples"] == 16
    assert full["trainable_percent"] == 100.0 and 0 < lora["trainable_percent"] < 10
    manifest = json.loads((out / "comparison.json").read_text())
    rates = {v["name"]: (v["learning_rate"], v["learning_rate_from"])
             for v in manifest["variants"]}
    # The base config's lr belongs to its own method (lora); full gets the full default.
    assert rates == {"lora": (5e-3, "base config"), "full": (DEFAULT_LEARNING_RATES["full"],
                                                             "default")}
    assert all(v["finished"] for v in manifest["variants"])
    # configs/NAME.yaml is a plain `deltatune train --config` file for the variant.
    config = yaml.safe_load((out / "configs/full.yaml").read_text())
    assert config["method"] == "full" and "method_options" not in config
    assert config["output_dir"] == str(out / "runs/full") and config["seed"] == 3


def test_report_table_holds_the_measurements(two_method_comparison):
    request, result = two_method_comparison
    data = json.loads(result.report.json.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert data["metric"] == "accuracy" and list(rows) == ["lora", "full"]
    for name in rows:
        summary = _summary(Path(request.out) / "runs" / name)
        assert rows[name]["metric"] == summary["final_metrics"]["accuracy"]
        for key in ("trainable_parameters", "peak_memory_bytes", "train_wall_seconds",
                    "train_tokens_per_second", "adapter_bytes"):
            assert rows[name][key] == summary[key]
    assert rows["full"]["trainable_parameters"] > 10 * rows["lora"]["trainable_parameters"]
    assert rows["full"]["adapter_bytes"] > rows["lora"]["adapter_bytes"]
    assert rows["lora"]["peak_memory_bytes"] > 0
    markdown = result.report.markdown.read_text()
    assert "| lora | lora | 0.005 |" in markdown and "| full | full | 5e-5 |" in markdown
    for figure in ("loss_curves.png", "metric_vs_params.png", "metric_vs_memory.png",
                   "metric_vs_time.png"):
        png = Path(request.out) / figure
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({figure})" in markdown
    html = result.report.html.read_text()
    assert html.count('src="data:image/png;base64,') == 4
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_second_call_does_not_retrain(two_method_comparison):
    request, _ = two_method_comparison
    out = Path(request.out)
    before = {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns
              for name in ("lora", "full")}
    again = run_comparison(request)
    assert again.trained == []
    assert [p.action for p in again.variants] == ["reuse", "reuse"]
    assert before == {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns
                      for name in ("lora", "full")}


def _base_with(setup: dict, tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load(setup["base"].read_text())
    raw["train"].update(train)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_interrupted_variant_resumes_from_its_checkpoint(tiny_classifier_setup, tmp_path):
    base = _base_with(tiny_classifier_setup, tmp_path, save_every=3)
    request = CompareRequest(config=str(base), variants=[Variant("lora", "lora")],
                             out=str(tmp_path / "cmp"), progress=False)
    first = run_comparison(request)
    run = tmp_path / "cmp/runs/lora"
    assert first.trained == ["lora"] and (run / "checkpoints").is_dir()
    # A run killed after its step-3 checkpoint: no summary yet.
    (run / "summary.json").unlink()
    assert [p.action for p in plan_comparison(request)] == ["resume"]
    second = run_comparison(request)
    assert second.trained == ["lora"]
    summary = _summary(run)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == STEPS


def test_interrupted_variant_without_checkpoint_restarts(tiny_classifier_setup, tmp_path):
    request = CompareRequest(config=str(tiny_classifier_setup["base"]),
                             variants=[Variant("lora", "lora")], out=str(tmp_path / "cmp"),
                             progress=False)
    run_comparison(request)
    run = tmp_path / "cmp/runs/lora"
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    assert [p.action for p in plan_comparison(request)] == ["restart"]
    assert run_comparison(request).trained == ["lora"]
    assert _summary(run)["resumed_from_step"] is None


def test_changed_settings_need_overwrite(two_method_comparison, tiny_classifier_setup, tmp_path):
    request, _ = two_method_comparison
    changed = CompareRequest(config=str(_base_with(tiny_classifier_setup, tmp_path,
                                                   batch_size=4)),
                             variants=request.variants, out=request.out, progress=False)
    with pytest.raises(ConfigError, match="holds a finished run with other settings; pass "
                                          "--overwrite"):
        plan_comparison(changed)
    changed.overwrite = True
    assert [p.action for p in plan_comparison(changed)] == ["restart", "restart"]


def test_learning_rates_and_options_per_variant(tiny_classifier_setup, tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump([
        {"name": "lora-r4", "method": "lora", "options": {"r": 4, "targets": ["query"]},
         "lr": 2e-3},
        {"method": "lora"}, {"method": "adapter"}, "prefix"]))
    request = CompareRequest(config=str(tiny_classifier_setup["base"]),
                             variants=read_variants_file(variants), out=str(tmp_path / "cmp"))
    planned = {p.variant.name: p for p in plan_comparison(request)}
    assert list(planned) == ["lora-r4", "lora", "adapter", "prefix"]
    assert (planned["lora-r4"].spec.train.learning_rate, planned["lora-r4"].learning_rate_from,
            planned["lora-r4"].spec.method_options) == (2e-3, "variant",
                                                        {"r": 4, "targets": ["query"]})
    assert planned["lora"].spec.method_options["r"] == 2  # the base config's own options
    assert planned["lora"].learning_rate_from == "base config"
    for name in ("adapter", "prefix"):
        assert planned[name].spec.train.learning_rate == DEFAULT_LEARNING_RATES[name]
        assert planned[name].spec.method_options == {}
    # Everything else is the base config's: same data, seed and loop for every variant.
    specs = [p.spec for p in planned.values()]
    assert len({(s.seed, s.data.train, s.train.max_steps, s.train.batch_size)
                for s in specs}) == 1
    assert all(p.action == "train" for p in planned.values())
    assert not (tmp_path / "cmp").exists()  # planning writes nothing


@pytest.mark.parametrize("content,message", [
    ("[]", "non-empty list"),
    ("- {method: lora, rank: 4}", r"unknown key\(s\) \['rank'\]"),
    ("- {method: lora}\n- {method: lora}", "appears twice"),
    ("- {method: lora, learning_rate: -1}", "positive number"),
    ("- {name: ../x, method: lora}", "folder name"),
    ("- {method: magic}", "unknown method 'magic'"),
    ("- {method: lora, options: [1]}", "options must be a mapping"),
])
def test_bad_variants_files(tmp_path, content, message):
    path = tmp_path / "v.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_variants_file(path)


def test_methods_flag():
    assert [v.name for v in variants_from_methods("full, lora,prefix")] == \
        ["full", "lora", "prefix"]
    with pytest.raises(ConfigError, match="appears twice"):
        variants_from_methods("lora,lora")
    with pytest.raises(ConfigError, match="--methods is empty"):
        variants_from_methods(" , ")


def test_variant_that_fails_names_its_error(tiny_classifier_setup, tmp_path, capsys):
    """A method option the model cannot take fails inside `deltatune train`; the comparison
    stops with that error, naming the variant."""
    request = CompareRequest(config=str(tiny_classifier_setup["base"]),
                             variants=[Variant("lora", "lora", {"targets": ["q_proj"]})],
                             out=str(tmp_path / "cmp"), progress=False)
    code = main(["compare", "--config", request.config, "--variants",
                 str(_write(tmp_path / "v.yaml", "- {method: lora, options: {targets: "
                                                 "[q_proj]}}")),
                 "--out", request.out, "--no-progress"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: variant lora: ") and "q_proj" in last


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_report_command_from_run_directories(two_method_comparison, tmp_path, capsys):
    request, _ = two_method_comparison
    runs = Path(request.out) / "runs"
    out = tmp_path / "report"
    assert main(["report", str(runs / "full"), str(runs / "lora"), "--out", str(out),
                 "--memory", "64GB"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["rows"]) == ["full", "lora"]
    data = json.loads((out / "report.json").read_text())
    assert data["memory_budget_bytes"] == 64 * 2 ** 30 and all(r["fits"] for r in data["rows"])
    assert "fits 64.00 GiB" in (out / "report.md").read_text()
    # A folder of runs (runs/) reads the same runs.
    assert main(["report", str(runs), "--out", str(tmp_path / "again")]) == 0
    assert {r["name"] for r in json.loads((tmp_path / "again/report.json").read_text())
            ["rows"]} == {"full", "lora"}


def test_report_command_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ") and \
        not (tmp_path / "r").exists()
    unfinished = tmp_path / "runs/half"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("model: x\n")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert main(["report", str(unfinished), "--out", str(tmp_path / "r"),
                 "--memory", "lots"]) == 2
    assert "memory budget 'lots' not understood" in capsys.readouterr().err
