"""Custom code in a model, tokenizer or adapter folder (`auto_map` naming a .py file) never runs
unless asked for: loading raises one CustomCodeError line instead of transformers asking on
stdin, and `--trust-remote-code` is what reaches transformers when the user does ask."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltatune
from deltatune.cli import main
from deltatune.errors import CustomCodeError, DeltatuneError
from deltatune.methods.lora import LoraConfig
from deltatune.models import load_model
from tests.conftest import tiny_llama
from tests.models.test_loading import llama_tokenizer

# Importing this file is what "running the custom code" means: it leaves a marker behind.
EVIL_CODE = 'from pathlib import Path\nPath({marker!r}).write_text("ran")\n'


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading must never ask: an `input()` call fails the test instead of blocking."""
    def refuse(*args, **kwargs):
        raise AssertionError("loading asked on stdin")
    monkeypatch.setattr("builtins.input", refuse)


def plant_code(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    llama_tokenizer().save_pretrained(folder)
    return folder


def test_a_model_config_with_auto_map_raises_and_runs_nothing(model_folder, tmp_path) -> None:
    marker = tmp_path / "ran.txt"
    plant_code(model_folder, marker)
    edit_json(model_folder / "config.json", model_type="evil",
              auto_map={"AutoConfig": "evil.EvilConfig",
                        "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    with pytest.raises(CustomCodeError) as error:
        load_model(str(model_folder))
    message = str(error.value)
    assert str(model_folder) in message and "contains custom code" in message
    assert "--trust-remote-code" in message and "\n" not in message
    assert not marker.exists()


def test_a_tokenizer_config_with_auto_map_raises_and_runs_nothing(model_folder,
                                                                  tmp_path) -> None:
    marker = tmp_path / "ran.txt"
    plant_code(model_folder, marker)
    edit_json(model_folder / "config.json", model_type="evil")
    edit_json(model_folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    with pytest.raises(CustomCodeError, match="contains custom code"):
        load_model(str(model_folder))
    assert not marker.exists()


def test_an_adapter_tokenizer_with_auto_map_is_refused_by_the_cli(model_folder, tmp_path,
                                                                  capsys) -> None:
    """The reported hole: `generate --run` on a folder from someone else ran its code."""
    adapter = tmp_path / "adapter"
    model = load_model(str(model_folder)).model
    deltatune.save_adapter(deltatune.apply(model, LoraConfig(r=2)), adapter)
    llama_tokenizer().save_pretrained(adapter)  # as textual inversion saves one
    marker = tmp_path / "ran.txt"
    plant_code(adapter, marker)
    edit_json(adapter / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    code = main(["generate", "--model", str(model_folder), "--adapter", str(adapter), "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # The last line is deltatune's (transformers' progress bars may come before it).
    assert err.strip().splitlines()[-1].startswith(f"error: {adapter} contains custom code")
    assert not marker.exists()


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval", "--data", "x.jsonl"]])
def test_trust_remote_code_is_off_unless_the_flag_is_given(command, monkeypatch) -> None:
    seen = []

    def fake_load_model(name, **options):
        seen.append(options["trust_remote_code"])
        raise DeltatuneError("stop here")

    monkeypatch.setattr("deltatune.jobs.inference.load_model", fake_load_model)
    assert main(command + ["--model", "some-folder"]) == 2
    assert main(command + ["--model", "some-folder", "--trust-remote-code"]) == 2
    assert seen == [False, True]
