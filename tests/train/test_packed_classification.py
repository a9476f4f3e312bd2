"""Classification on packed rows: the sentences of a batch side by side in one row give the same
logits, loss and gradients as the padded batch (tiny BERT, LoRA); a model whose head does not
read the first token (a Llama `score` head) is refused and stays padded."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import deltatune
from deltatune.data.collate import pad_batch
from deltatune.data.packing import collate_packed_sequences
from deltatune.methods.lora import LoraConfig
from deltatune.train.objectives import ClassificationObjective
from deltatune.train.packed_attention import enable_packed_attention
from deltatune.train.packed_classification import (can_pack_classification,
                                                   install_packed_classification)
from tests.conftest import tiny_bert


def _examples() -> list[dict]:
    generator = torch.Generator().manual_seed(4)
    examples = []
    for index, length in enumerate((5, 9, 3, 7)):
        ids = torch.randint(5, 128, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "token_type_ids": [0] * length, "label": index % 2})
    return examples


def _model():
    model = tiny_bert()
    deltatune.apply(model, LoraConfig(r=4, targets=["query", "value"], init="gaussian",
                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model.train()  # training mode; tiny_bert's dropout is switched off below


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = ClassificationObjective()(model, batch)
    output.loss.backward()
    return output.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                if p.grad is not None}


def test_packed_rows_give_the_padded_loss_and_gradients():
    examples = _examples()
    padded_model, packed_model = _no_dropout(_model()), _no_dropout(_model())
    padded = _loss_and_grads(padded_model, pad_batch(examples, pad_token_id=0))
    enable_packed_attention(packed_model)
    assert install_packed_classification(packed_model)
    batch = collate_packed_sequences(examples)
    assert batch["input_ids"].shape == (1, 24) and batch["labels"].tolist() == [0, 1, 0, 1]
    packed = _loss_and_grads(packed_model, batch)
    assert abs(packed[0] - padded[0]) < 1e-6
    assert packed[1].keys() == padded[1].keys() and packed[1]
    for name, gradient in padded[1].items():
        torch.testing.assert_close(packed[1][name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_padded_batches_are_untouched_by_the_hook():
    model = _no_dropout(_model()).eval()
    batch = pad_batch(_examples(), pad_token_id=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs).logits
    enable_packed_attention(model)
    install_packed_classification(model)
    assert torch.equal(model(**inputs).logits, before)


def test_a_last_token_head_is_refused():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=2, pad_token_id=0, attn_implementation="sdpa")
    model = LlamaForSequenceClassification(config).eval()
    assert not can_pack_classification(model)
    assert can_pack_classification(tiny_bert())
