"""QLoRA end to end through the command line: `--method qlora` (= `--method lora --quantize
nf4`) trains on a base frozen in NF4, records the quantization in summary.json, and the run
evaluates and generates on the same quantized base; `deltatune quantize` writes a packed folder
that loads back, with the report the docs promise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.models import load_model
from deltatune.quant import QuantizedTensor
from deltatune.spec import read_run_spec
from tests.models.test_custom_code import model_folder  # noqa: F401 (fixture)


def train_rows(folder: Path, count: int = 16) -> Path:
    path = folder / "train.jsonl"
    rows = [{"instruction": f"repeat {i}", "output": f"hello {i} world"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(model_folder: Path, tmp_path: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    code = main(["train", "--model", str(model_folder), "--train", str(train_rows(tmp_path)),
                 "--template", "alpaca", "--max-steps", "3", "--batch-size", "4",
                 "--metric", "perplexity", "--output-dir", str(run), "--no-progress",
                 "-o", "targets=all-linear", "-o", "r=4", *extra])
    assert code == 0
    return run


def test_qlora_trains_on_an_nf4_base_and_the_run_reloads_quantized(model_folder, tmp_path,
                                                                   capsys) -> None:
    run = train(model_folder, tmp_path, "--method", "qlora")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "qlora"
    assert summary["quantization"]["format"] == "nf4"
    assert summary["quantization"]["streamed"] is True
    assert summary["final_metrics"]["perplexity"] < summary["baseline_metrics"]["perplexity"]
    assert read_run_spec(run).quantization() == "nf4"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"  # the same files as LoRA: PEFT reads them
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["perplexity"] == pytest.approx(summary["final_metrics"]["perplexity"],
                                                  rel=1e-3)


def test_quantize_flag_with_another_method_and_a_bf16_base(model_folder, tmp_path) -> None:
    run = train(model_folder, tmp_path, "--method", "lora", "--quantize", "int8",
                "--base-dtype", "bf16")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantization"]["format"] == "int8"
    assert summary["base_dtype"]["chosen"] == "bf16"
    assert summary["final_train_loss"] > 0


def test_a_wrong_format_name_is_one_line(capsys, tmp_path) -> None:
    assert main(["train", "--quantize", "int5", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "int5" in err and "nf4" in err and len(err.strip().splitlines()) == 1


def test_quantize_command_writes_a_packed_model_with_its_report(model_folder, tmp_path,
                                                                capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 40}" for i in range(600)))
    out = tmp_path / "packed"
    code = main(["quantize", str(model_folder), "--format", "int4-g32", "--out", str(out),
                 "--eval-text", str(text), "--eval-tokens", "256", "--generate-tokens", "4",
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["format"]["name"] == "int4-g32"
    assert report["bytes_on_disk"] < report["fp32_bytes"]
    assert 0 < report["weight_relative_error"] < 0.5
    assert report["before"]["perplexity"] > 0 and report["after"]["perplexity"] > 0
    assert report["after"]["ms_per_token"] > 0
    loaded = load_model(str(out))
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj.weight, QuantizedTensor)
    capsys.readouterr()
    assert main(["quantize", str(model_folder), "--format", "nf4", "--out", str(out),
                 "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_quantize_of_a_run_merges_its_adapter_first(model_folder, tmp_path) -> None:
    run = train(model_folder, tmp_path, "--method", "lora")
    out = tmp_path / "merged-int8"
    assert main(["quantize", str(run), "--format", "int8", "--out", str(out), "--no-eval",
                 "--generate-tokens", "0", "--no-progress"]) == 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["layers_quantized"] == 14


def test_export_of_a_qlora_run_is_dense_and_reports_the_requantization_error(
        model_folder, tmp_path) -> None:
    from deltatune.jobs.export import ExportRequest, export_merged
    run = train(model_folder, tmp_path, "--method", "qlora", "--lr", "1e-2")
    report = export_merged(ExportRequest(out=str(tmp_path / "merged"), run=str(run),
                                         progress=False))
    assert report["max_logit_diff"] <= 1e-4 * max(1.0, report.get("logit_scale", 1.0))
    requantization = report["requantization"]
    assert requantization["format"] == "nf4" and requantization["layers"] == 14
    assert 0 < requantization["delta_relative_norm"] < 1
    assert 0 < requantization["weight_relative_error"] < 0.3
