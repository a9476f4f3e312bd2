"""Batched, gradient-free evaluation of a model (with or without a method applied):
classification accuracy / macro-F1, language-model perplexity, and exact match of greedy
generations against reference answers."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from deltatune.data.collate import pad_batch
from deltatune.errors import DataError
from deltatune.eval.metrics import accuracy, exact_match, macro_f1, perplexity
from deltatune.models.fused_loss import fused_loss_installed, label_loss_sum


def _chunks(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate_classification(model: torch.nn.Module, examples: list[dict], num_classes: int,
                            pad_token_id: int, batch_size: int = 64,
                            show_progress: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    labels: list[int] = []
    total_loss = 0.0
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="eval", disable=not show_progress):
        batch = {k: v.to(_device(model)) for k, v in pad_batch(chunk, pad_token_id).items()}
        targets = batch.pop("labels")
        logits = model(**batch).logits
        total_loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        predictions.extend(logits.argmax(-1).tolist())
        labels.extend(targets.tolist())
    model.train(was_training)
    return {"accuracy": accuracy(predictions, labels),
            "macro_f1": macro_f1(predictions, labels, num_classes),
            "loss": total_loss / len(labels)}


@torch.inference_mode()
def evaluate_perplexity(model: torch.nn.Module, examples: list[dict], pad_token_id: int,
                        batch_size: int = 8, show_progress: bool = False) -> dict[str, float]:
    """Perplexity over the labelled tokens (response tokens for instruction data), with the
    output head fused into the loss where exact, so no full-vocabulary logits are built."""
    was_training = model.training
    model.eval()
    total_nll, tokens = 0.0, 0
    with fused_loss_installed(model):
        for chunk in tqdm(list(_chunks(examples, batch_size)), desc="eval",
                          disable=not show_progress):
            batch = {k: v.to(_device(model)) for k, v in pad_batch(chunk, pad_token_id).items()}
            label_loss = label_loss_sum(model, batch)
            total_nll += label_loss.loss_sum.item()
            tokens += label_loss.label_tokens
    model.train(was_training)
    loss = total_nll / max(tokens, 1)
    return {"loss": loss, "perplexity": perplexity(total_nll, tokens)}


def _left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _start_of_text(tokenizer: Any) -> list[int]:
    """What an empty prompt (an empty instruction with template none) is continued from: the
    BOS token, as transformers' `generate` does without input; EOS where there is no BOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    if start is None:
        raise DataError("a prompt is empty and the tokenizer has neither a BOS nor an EOS token "
                        "to start from; give every example a non-empty instruction")
    return [start]


@torch.inference_mode()
def generate_texts(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]],
                   max_new_tokens: int = 32, batch_size: int = 16,
                   show_progress: bool = False) -> list[str]:
    """Greedy continuations of tokenized prompts (left-padded batches, KV cache)."""
    was_training = model.training
    model.eval()
    prompts = [prompt or _start_of_text(tokenizer) for prompt in prompts]
    outputs: list[str] = []
    for chunk in tqdm(list(_chunks(prompts, batch_size)), desc="generate",
                      disable=not show_progress):
        batch = {k: v.to(_device(model)) for k, v in
                 _left_pad(chunk, tokenizer.pad_token_id).items()}
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=stop_token_ids(tokenizer))
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat end-of-turn token when the tokenizer has one (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def evaluate_exact_match(model: torch.nn.Module, tokenizer: Any, examples: list[dict],
                         max_new_tokens: int = 32, batch_size: int = 16,
                         show_progress: bool = False) -> dict[str, Any]:
    predictions = generate_texts(model, tokenizer, [e["prompt_ids"] for e in examples],
                                 max_new_tokens, batch_size, show_progress)
    references = [e["reference"] for e in examples]
    samples = [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:5]]
    return {"exact_match": exact_match(predictions, references), "samples": samples}
