"""LoRA adapter files are interchangeable with Hugging Face PEFT (0.21) in both directions:
deltatune-trained adapters load with `PeftModel.from_pretrained`, PEFT-saved adapters load with
`deltatune.load_adapter`, with the same logits (fp32, 1e-5) and the same tensor keys."""
from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.methods.lora import LoraConfig, apply_lora
from tests.conftest import random_batch, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
TOLERANCE = 1e-5


class TinyConvNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3)))


def llama_case() -> dict:
    return {"build": tiny_llama, "targets": LLAMA_TARGETS, "save": [], "task": "CAUSAL_LM",
            "batch": random_batch(),
            "loss": lambda m, b: m(**b, labels=b["input_ids"]).loss}


def bert_case() -> dict:
    return {"build": tiny_bert, "targets": ["query", "value"], "save": ["classifier"],
            "task": "SEQ_CLS", "batch": random_batch(),
            "loss": lambda m, b: m(**b, labels=torch.tensor([0, 1])).loss}


CASES: dict[str, Callable[[], dict]] = {"llama": llama_case, "bert": bert_case}


def logits(model: nn.Module, batch: dict | torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if isinstance(batch, torch.Tensor):
            return model(batch)
        return model(**batch).logits


def train_a_few_steps(handle, case: dict, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    handle.model.train()
    for _ in range(steps):
        loss = case["loss"](handle.model, case["batch"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.model.eval()


def perturb_peft(peft_model: nn.Module, seed: int = 5) -> None:
    """PEFT starts with B = 0; random adapter (and head) weights make the comparison meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    """Equal within the tolerance, and the adapter really moved the outputs off the base."""
    assert (expected - base).abs().max().item() > 1e-3
    assert (actual - expected).abs().max().item() < TOLERANCE


# -- deltatune -> PEFT -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(CASES))
def test_deltatune_adapter_loads_in_peft(tmp_path, model_name, variant):
    case = CASES[model_name]()
    handle = apply_lora(case["build"](), LoraConfig(
        r=4, alpha=8, targets=case["targets"], modules_to_save=case["save"], **VARIANTS[variant]))
    train_a_few_steps(handle, case)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in handle.layers.values())
    expected = logits(handle.model, case["batch"])
    deltatune.save_adapter(handle, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(case["build"](), str(tmp_path))
    assert_close(logits(peft_model, case["batch"]), expected,
                 logits(case["build"](), case["batch"]))
    # PEFT sees exactly our tensors under its own keys
    peft_state = peft.get_peft_model_state_dict(peft_model)
    ours = handle.state_dict()
    assert set(peft_state) == set(ours)
    assert all(torch.equal(peft_state[k], ours[k]) for k in ours)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_biases_load_in_peft(tmp_path, bias):
    case = bert_case()
    handle = apply_lora(case["build"](), LoraConfig(r=4, targets=case["targets"], bias=bias,
                                                    modules_to_save=["classifier"]))
    train_a_few_steps(handle, case)
    expected = logits(handle.model, case["batch"])
    deltatune.save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case["build"](), str(tmp_path))
    assert_close(logits(peft_model, case["batch"]), expected,
                 logits(case["build"](), case["batch"]))


# -- PEFT -> deltatune -----------------------------------------------------------------------

def peft_model_for(case: dict, **options) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=options.pop("targets",
                                                                          case["targets"]),
                             modules_to_save=case["save"] or None, task_type=case["task"],
                             **options)
    return peft.get_peft_model(case["build"](), config)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", list(CASES))
def test_peft_adapter_loads_in_deltatune(tmp_path, model_name, variant):
    case = CASES[model_name]()
    peft_model = peft_model_for(case, **VARIANTS[variant])
    perturb_peft(peft_model)
    expected = logits(peft_model, case["batch"])
    peft_model.save_pretrained(str(tmp_path))

    handle = deltatune.load_adapter(case["build"](), tmp_path)
    assert_close(logits(handle.model, case["batch"]), expected,
                 logits(case["build"](), case["batch"]))
    assert set(handle.state_dict()) == set(load_file(str(tmp_path / "adapter_model.safetensors")))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_trainable_biases_load_in_deltatune(tmp_path, bias):
    case = bert_case()
    peft_model = peft_model_for(case, bias=bias)
    perturb_peft(peft_model)
    expected = logits(peft_model, case["batch"])
    peft_model.save_pretrained(str(tmp_path))
    handle = deltatune.load_adapter(case["build"](), tmp_path)
    assert_close(logits(handle.model, case["batch"]), expected,
                 logits(case["build"](), case["batch"]))
    # PEFT's file also holds its wrapper copies of the head for bias='all'; we skip those
    saved = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    wrapper_copies = {k for k in saved if ".modules_to_save." in k or ".original_module." in k}
    assert set(handle.state_dict()) == saved - wrapper_copies
    assert bool(wrapper_copies) == (bias == "all")


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_training_mode_with_dropout_matches_peft(tmp_path, variant):
    """Same seed, same dropout masks: PEFT's DoRA-with-dropout formula is reproduced too."""
    case = llama_case()
    handle = apply_lora(case["build"](), LoraConfig(r=4, alpha=8, dropout=0.3,
                                                    targets=case["targets"], **VARIANTS[variant]))
    train_a_few_steps(handle, case)
    deltatune.save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case["build"](), str(tmp_path), is_trainable=True)
    outputs = []
    for model in (handle.model, peft_model):
        model.train()
        torch.manual_seed(7)
        outputs.append(model(**case["batch"]).logits.detach())
    eval_logits = logits(handle.model, case["batch"])
    assert_close(outputs[0], outputs[1], eval_logits)


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|v_proj)"])
def test_peft_all_linear_and_regex_targets_load_in_deltatune(tmp_path, targets):
    case = llama_case()
    peft_model = peft_model_for(case, targets=targets)
    perturb_peft(peft_model)
    expected = logits(peft_model, case["batch"])
    peft_model.save_pretrained(str(tmp_path))
    handle = deltatune.load_adapter(case["build"](), tmp_path)
    assert_close(logits(handle.model, case["batch"]), expected,
                 logits(case["build"](), case["batch"]))
    assert len(handle.layers) == (14 if targets == "all-linear" else 4)


def test_deltatune_config_reads_as_a_peft_lora_config(tmp_path):
    handle = apply_lora(tiny_bert(), LoraConfig(r=4, alpha=8, targets="all-linear",
                                                modules_to_save=["classifier"], use_dora=True))
    deltatune.save_adapter(handle, tmp_path, base_model_name_or_path="tiny-bert")
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.use_dora) == (4, 8, True)
    assert config.base_model_name_or_path == "tiny-bert" and config.task_type == "SEQ_CLS"
    assert set(config.target_modules) == set(handle.layers)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["init_lora_weights"] is True


# -- Embedding and Conv2d, both directions ---------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_embedding_lora_round_trips_with_peft(tmp_path, variant, tie):
    batch = random_batch()
    build = lambda: tiny_llama(tie=tie)  # noqa: E731
    handle = apply_lora(build(), LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"],
                                            **VARIANTS[variant]))
    with torch.no_grad():
        for layer in handle.layers.values():
            for name, parameter in layer.named_parameters():
                if not name.startswith("base_layer"):
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    expected = logits(handle.model, batch)
    deltatune.save_adapter(handle, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours"))
    assert_close(logits(peft_model, batch), expected, logits(build(), batch))

    peft_model = peft.get_peft_model(build(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], **VARIANTS[variant]))
    perturb_peft(peft_model)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in saved
    loaded = deltatune.load_adapter(build(), tmp_path / "peft")
    assert_close(logits(loaded.model, batch), expected, logits(build(), batch))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv2d_lora_round_trips_with_peft(tmp_path, variant):
    images = torch.randn(2, 3, 8, 8)
    handle = apply_lora(TinyConvNet(), LoraConfig(r=2, alpha=4, targets=["conv1", "conv2"],
                                                  **VARIANTS[variant]))
    with torch.no_grad():
        for layer in handle.layers.values():
            for name, parameter in layer.named_parameters():
                if not name.startswith("base_layer"):
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    expected = logits(handle.model, images)
    deltatune.save_adapter(handle, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(TinyConvNet(), str(tmp_path / "ours"))
    assert_close(logits(peft_model, images), expected, logits(TinyConvNet(), images))

    peft_model = peft.get_peft_model(TinyConvNet(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["conv1", "conv2"], **VARIANTS[variant]))
    perturb_peft(peft_model)
    expected = logits(peft_model, images)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = deltatune.load_adapter(TinyConvNet(), tmp_path / "peft")
    assert_close(logits(loaded.model, images), expected, logits(TinyConvNet(), images))
    assert set(loaded.state_dict()) == set(load_file(str(tmp_path / "peft" /
                                                         "adapter_model.safetensors")))
