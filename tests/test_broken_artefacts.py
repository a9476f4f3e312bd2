"""Damaged or hostile artefacts (adapter files, a run's config.yaml and labels.json, tokenizer
configs) and out-of-range flags give one `error:` line and exit code 2, never a traceback; an
adapter with NaN/inf or integer tensors is refused by name; eval's JSON never holds NaN."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.cli import main
from deltatune.errors import AdapterFormatError
from deltatune.methods.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from deltatune.methods.lora import LoraConfig
from tests.conftest import tiny_llama
from tests.models.test_custom_code import model_folder  # noqa: F401 (fixture)
from tests.models.test_loading import llama_tokenizer



@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    deltatune.save_adapter(deltatune.apply(tiny_llama(), LoraConfig(r=2)), folder)
    return folder


def one_line_error(capsys, code: int) -> str:
    """deltatune's error line: the last line of stderr (transformers' progress bars may come
    before it), with no traceback anywhere."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def generate(model_folder: Path, adapter: Path) -> int:
    return main(["generate", "--model", str(model_folder), "--adapter", str(adapter),
                 "--max-new-tokens", "2", "hi"])


# -------------------------------------------------------------------------- adapter files

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_weights_file_is_one_line(model_folder, adapter, damage, capsys) -> None:
    weights = adapter / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
    err = one_line_error(capsys, generate(model_folder, adapter))
    assert f"{weights} is not a readable safetensors file" in err and "truncated" in err


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "must hold a JSON object (got a list)"),
    ("{not json", "is not valid JSON"),
])
def test_a_broken_adapter_config_is_one_line(model_folder, adapter, text, expected,
                                             capsys) -> None:
    (adapter / CONFIG_NAME).write_text(text)
    err = one_line_error(capsys, generate(model_folder, adapter))
    assert str(adapter / CONFIG_NAME) in err and expected in err


@pytest.mark.parametrize("poison, expected", [
    (lambda t: torch.full_like(t, math.nan), "holds NaN or infinite values"),
    (lambda t: torch.full_like(t, math.inf), "holds NaN or infinite values"),
    (lambda t: t.to(torch.int64), "has dtype torch.int64"),
])
def test_adapter_tensors_must_be_finite_floats(adapter, poison, expected) -> None:
    weights = adapter / WEIGHTS_NAME
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = poison(state[name])
    save_file(state, str(weights))
    with pytest.raises(AdapterFormatError, match=expected) as error:
        load_adapter(tiny_llama(), adapter)
    assert f"tensor '{name}'" in str(error.value)


def test_a_nan_adapter_is_refused_by_generate(model_folder, adapter, capsys) -> None:
    weights = adapter / WEIGHTS_NAME
    state = {k: torch.full_like(v, math.nan) for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    assert "NaN or infinite" in one_line_error(capsys, generate(model_folder, adapter))


@pytest.mark.parametrize("where", ["adapter", "model"])
def test_an_invalid_tokenizer_config_is_one_line(model_folder, adapter, where,
                                                 capsys) -> None:
    if where == "adapter":
        llama_tokenizer().save_pretrained(adapter)
    folder = adapter if where == "adapter" else model_folder
    (folder / "tokenizer_config.json").write_text("{broken")
    err = one_line_error(capsys, generate(model_folder, adapter))
    assert f"no usable tokenizer at {folder}" in err


# ------------------------------------------------------------------------------ run folders

def make_run(tmp_path: Path, model_folder: Path, task: str = "causal-lm") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(model_folder), "task": task}))
    return run


@pytest.mark.parametrize("text, expected", [
    ("model: [unclosed\n", "is not valid YAML"),
    ("model: x\nlearning_rate: 1\n", "config field 'learning_rate'"),
    ("", "is empty"),
    ("- a\n- b\n", "holds a list"),
])
def test_a_damaged_run_config_is_one_line(tmp_path, model_folder, text, expected,
                                          capsys) -> None:
    run = make_run(tmp_path, model_folder)
    (run / "config.yaml").write_text(text)
    for command in (["eval", "--run", str(run)], ["generate", "--run", str(run), "hi"],
                    ["train", "--resume", str(run)]):
        err = one_line_error(capsys, main(command))
        assert str(run / "config.yaml") in err and expected in err, err


@pytest.mark.parametrize("labels", [None, "{oops", "[1]", '{"names": ["a"]}',
                                    '{"label_names": []}', '{"label_names": [1, 2]}'])
def test_labels_json_missing_or_invalid_is_one_line(tmp_path, model_folder, labels,
                                                    capsys) -> None:
    run = make_run(tmp_path, model_folder, task="classification")
    if labels is not None:
        (run / "labels.json").write_text(labels)
    err = one_line_error(capsys, main(["eval", "--run", str(run), "--no-progress"]))
    assert "labels.json" in err


# ------------------------------------------------------------------------------------ flags

@pytest.mark.parametrize("command, flag", [
    (["eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--limit", "-3"], "--limit"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
])
def test_non_positive_counts_are_refused_by_argparse(command, flag, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive whole number" in err


def test_eval_output_that_cannot_be_a_file_fails_before_evaluating(tmp_path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr("deltatune.jobs.inference.evaluate_saved",
                        lambda request: pytest.fail("evaluated before checking --output"))
    folder = tmp_path / "out"
    folder.mkdir()
    err = one_line_error(capsys, main(["eval", "--model", "m", "--output", str(folder)]))
    assert f"--output {folder} is a folder" in err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = one_line_error(capsys, main(["eval", "--model", "m", "--output",
                                       str(blocker / "metrics.json")]))
    assert f"{blocker} is a file, not a folder" in err


def test_classification_with_a_builtin_task_is_one_line(tmp_path, capsys) -> None:
    err = one_line_error(capsys, main(["train", "--task", "classification", "--builtin",
                                       "dates", "--output-dir", str(tmp_path / "r"),
                                       "--no-progress"]))
    assert "dates" in err and "causal-lm" in err


@pytest.mark.parametrize("under", [False, True])
def test_output_dir_that_is_or_lies_under_a_file(tmp_path, under, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    output = blocker / "run" if under else blocker
    err = one_line_error(capsys, main(["train", "--output-dir", str(output),
                                       "--no-progress"]))
    assert f"{blocker} is a file, not a folder" in err


# ----------------------------------------------------------------------------- eval output

def test_non_finite_metrics_become_null_with_a_note() -> None:
    from deltatune.jobs.inference import finite_or_null

    metrics = finite_or_null({"model": "m", "examples": 3, "perplexity": math.inf,
                              "loss": math.nan, "exact_match": 0.5})
    assert metrics == {"model": "m", "examples": 3, "perplexity": None, "loss": None,
                       "exact_match": 0.5, "non_finite": ["loss", "perplexity"]}
    assert finite_or_null({"accuracy": 1.0}) == {"accuracy": 1.0}


def test_eval_prints_and_writes_strict_json(tmp_path, capsys, monkeypatch) -> None:
    from deltatune.jobs.inference import finite_or_null

    monkeypatch.setattr("deltatune.jobs.inference.evaluate_saved",
                        lambda request: finite_or_null({"perplexity": math.inf}))
    output = tmp_path / "metrics.json"
    assert main(["eval", "--model", "m", "--output", str(output)]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON output")
    for text in (capsys.readouterr().out, output.read_text()):
        assert json.loads(text, parse_constant=refuse) == {"perplexity": None,
                                                            "non_finite": ["perplexity"]}
