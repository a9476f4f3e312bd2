"""`deltatune plan`: the extrapolation arithmetic, the memory split, the budget, the table and the
recommendation on hand-made probe runs (milliseconds), and one real plan of a tiny random Llama
through the command line (two probe trainings of a few seconds each)."""
from __future__ import annotations

import json

import pytest

from deltatune.errors import ConfigError
from deltatune.plan.estimate import (MemoryBudget, estimate_method, extrapolate, is_constrained,
                                     mark_fits, parse_memory, resolve_budget, split_peak)
from deltatune.plan.planner import (PlanRequest, _conclude, markdown_table,
                                    render_markdown, table_rows)
from deltatune.plan.probe import ProbeRun
from tests.conftest import tiny_llama
from tests.models.test_loading import llama_tokenizer

MB = 10**6


def probe(layers: int, peak_mb: float, trainable: int, total: int, steps=(2.0, 1.0, 1.0),
          quantization=None) -> ProbeRun:
    return ProbeRun(layers=layers, peak_memory_bytes=int(peak_mb * MB), step_seconds=list(steps),
                    trainable_parameters=trainable, total_parameters=total,
                    quantization=quantization)


def test_extrapolation_is_the_line_through_both_probes():
    assert extrapolate(1, 100.0, 2, 130.0, 30) == pytest.approx(100 + 29 * 30)
    assert extrapolate(2, 50.0, 4, 40.0, 6) == pytest.approx(30.0)
    with pytest.raises(ValueError):
        extrapolate(2, 1.0, 2, 2.0, 8)


def test_estimate_extrapolates_peak_parameters_and_time_and_the_split_adds_up():
    runs = [probe(1, 900, 1_000, 10_000_000, (5.0, 1.0, 1.2)),
            probe(2, 960, 2_000, 13_000_000, (5.0, 1.5, 1.5))]
    estimate = estimate_method("lora", runs, layers=30)
    assert estimate.trainable_parameters == 30_000
    assert estimate.total_parameters == 10_000_000 + 29 * 3_000_000
    assert estimate.peak_bytes == (900 + 29 * 60) * MB
    # The first step of each probe is not timed: medians 1.2 and 1.5 s.
    assert estimate.seconds_per_step == pytest.approx(1.2 + 29 * 0.3)
    split = estimate.split
    assert split.weights == estimate.total_parameters * 4
    assert split.gradients == 30_000 * 4 and split.optimizer == 30_000 * 8
    assert split.weights + split.gradients + split.optimizer + split.activations \
        == split.total == estimate.peak_bytes
    assert split.activations > 0


def test_quantized_linears_count_at_their_packed_size():
    runs = [probe(1, 500, 10, 1_000_000, quantization={"dense_bytes": 2_000_000,
                                                       "packed_bytes": 300_000}),
            probe(2, 520, 20, 1_500_000, quantization={"dense_bytes": 3_000_000,
                                                       "packed_bytes": 450_000})]
    estimate = estimate_method("qlora", runs, layers=4)
    # weights at 1 layer: 4 MB - 2 MB + 0.3 MB; each layer adds 2 MB - 1 MB + 0.15 MB.
    assert estimate.split.weights == 2_300_000 + 3 * 1_150_000


def test_a_peak_below_the_static_memory_is_raised_to_it():
    split = split_peak(peak_bytes=100, weight_bytes=80, trainable_parameters=10)
    assert (split.gradients, split.optimizer, split.activations) == (40, 80, 0)
    assert split.total == 200


def test_a_failed_probe_gives_a_reason_and_no_numbers():
    runs = [ProbeRun(layers=1, error="bitsandbytes needs CUDA"), ProbeRun(layers=2, error="x")]
    estimate = estimate_method("qlora", runs, layers=30)
    assert not estimate.measurable
    assert estimate.peak_bytes is None and estimate.split is None
    assert estimate.error == "not measurable here: bitsandbytes needs CUDA"


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24 gb", 24 * 10**9),
                                           ("1.5G", 1_500_000_000), ("16GiB", 16 * 2**30),
                                           ("512MiB", 512 * 2**20), ("2000", 2000)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "24 GQ", "-3GB", "0GB", ""])
def test_bad_memory_sizes_are_config_errors(text):
    with pytest.raises(ConfigError, match="--memory"):
        parse_memory(text)


def test_budget_sources():
    assert resolve_budget("8GB", None) == MemoryBudget(8 * 10**9, "--memory 8GB")
    here = resolve_budget(None, None)
    assert here.bytes > 0 and "available RAM" in here.source
    with pytest.raises(ConfigError, match="not both"):
        resolve_budget("8GB", "cuda:0")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_budget(None, "gpu0")


def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_budget(None, "cuda:0")


def _estimates(full_peak_mb: float, lora_peak_mb: float):
    full = estimate_method("full", [probe(1, full_peak_mb / 2, 5_000_000, 5_000_000),
                                    probe(2, full_peak_mb * 3 / 4, 7_000_000, 7_000_000)], 3)
    lora = estimate_method("lora", [probe(1, lora_peak_mb / 2, 100, 5_000_100),
                                    probe(2, lora_peak_mb * 3 / 4, 200, 7_000_200)], 3)
    failed = estimate_method("qlora", [ProbeRun(layers=1, error="no kernel"),
                                       ProbeRun(layers=2, error="no kernel")], 3)
    return [full, lora, failed]


def test_fits_constrained_and_the_recommendation_follow_the_budget():
    estimates = _estimates(full_peak_mb=4000, lora_peak_mb=1000)
    roomy = MemoryBudget(10_000 * MB, "test")
    assert mark_fits(estimates, roomy) == {"full": True, "lora": True}
    assert not is_constrained(estimates, roomy, 9_000_000)
    request = PlanRequest(model="tiny", methods=["full", "lora", "qlora"])
    plan = _conclude(request, roomy, 3, estimates, 1.0)
    assert plan.recommendation.method == "full"

    tight = MemoryBudget(2000 * MB, "test")
    plan = _conclude(request, tight, 3, _estimates(4000, 1000), 1.0)
    assert [e.fits for e in plan.estimates] == [False, True, None]
    assert plan.recommendation.method == "lora"
    # Full fine-tuning does not fit: the framework's constrained order, LoRA first.
    assert plan.recommendation.preference[0] == "lora"

    none = _conclude(request, MemoryBudget(10 * MB, "test"), 3, _estimates(4000, 1000), 1.0)
    assert none.recommendation.method is None


def test_the_table_shows_the_split_and_the_failed_method():
    request = PlanRequest(model="tiny", methods=["full", "lora", "qlora"])
    plan = _conclude(request, MemoryBudget(2000 * MB, "test"), 3, _estimates(4000, 1000), 1.0)
    rows = table_rows(plan)
    assert [row[0] for row in rows] == ["full", "lora", "qlora"]
    assert rows[0][6] == "4.00 GB" and rows[0][7] == "no"
    assert rows[1][7] == "yes" and rows[1][1] == "300"
    assert rows[2][1:] == ["—"] * 8
    text = render_markdown(plan)
    assert "**Recommendation: lora**" in text and "not measurable here: no kernel" in text
    assert markdown_table(["a", "b"], [["1", "2"]]).splitlines() == ["| a | b |", "|---|---|",
                                                                     "| 1 | 2 |"]


def test_unknown_method_and_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        PlanRequest(model="tiny", methods=["lora", "sparse-magic"]).check()
    with pytest.raises(ConfigError, match="--batch-size"):
        PlanRequest(model="tiny", batch_size=0).check()


def _cli(argv: list[str]) -> int:
    """The real command line: `deltatune plan` as cli.main parses and runs it."""
    from deltatune.cli import main

    return main(argv)


def test_cli_refuses_bad_flags_before_probing(tmp_path, capsys):
    assert _cli(["plan", "--model", str(tmp_path), "--methods", "lora,magic"]) == 2
    assert _cli(["plan", "--model", str(tmp_path), "--memory", "lots"]) == 2


def test_cli_plans_a_tiny_model_end_to_end(tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    llama_tokenizer().save_pretrained(folder)
    out = tmp_path / "plan"
    assert _cli(["plan", "--model", str(folder), "--methods", "lora", "--batch-size", "2",
                 "--max-length", "16", "--eval-batch-size", "4", "--memory", "64GB",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "recommendation: lora" in printed
    plan = json.loads((out / "plan.json").read_text())
    (lora,) = plan["estimates"]
    assert lora["error"] is None
    assert [p["layers"] for p in lora["probes"]] == [1, 2]
    # The tiny model has 2 layers: the extrapolation to 2 is the 2-layer probe itself.
    assert lora["peak_bytes"] == max(lora["probes"][1]["peak_memory_bytes"],
                                     sum(lora["split"][k] for k in
                                         ("weights", "gradients", "optimizer")))
    assert lora["trainable_parameters"] == lora["probes"][1]["trainable_parameters"]
    assert lora["seconds_per_step"] > 0
    assert sum(lora["split"][k] for k in ("weights", "gradients", "optimizer",
                                          "activations")) == lora["peak_bytes"]
    assert json.loads((out / "config.json").read_text())["methods"] == ["lora"]
    assert "| lora |" in (out / "plan.md").read_text()
    # A second plan into the same folder is refused without --overwrite.
    assert _cli(["plan", "--model", str(folder), "--methods", "lora", "--out", str(out)]) == 2


def test_probe_depths_are_a_quarter_and_a_half_of_the_model():
    from deltatune.plan.planner import probe_depths
    assert probe_depths(30) == (7, 15)
    assert probe_depths(6) == (1, 3)
    assert probe_depths(2) == (1, 2)
    assert probe_depths(1) == (1, 2)  # the line through 1 and 2 read back at 1
