"""Checks shared by the prompt tuning, P-tuning and prefix tuning tests: the two ways the training
code calls a model (backbone + head on label positions for causal LM, `model(...)` for
classification), a few optimizer steps, greedy generation against an uncached forward, and
logits of Hugging Face PEFT models for the compatibility tests."""
from __future__ import annotations

import torch
from torch import nn

from deltatune.methods.base import MethodHandle

TOLERANCE = 1e-5


def causal_lm_batch(batch: int = 2, length: int = 10, vocab_size: int = 128,
                    seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows (the second one shorter) with labels on the real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classification_batch(batch: int = 4, length: int = 8, vocab_size: int = 128,
                         seed: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length - 2:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2:] = 1
    labels = torch.arange(batch) % 2
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids, "labels": labels}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What deltatune's training loop does: backbone hidden states, then the output head on the
    label positions only."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    positions = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][positions])
    return nn.functional.cross_entropy(logits, targets[positions])


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"])


def train_steps(handle: MethodHandle, loss_fn, batch: dict[str, torch.Tensor], steps: int = 8,
                learning_rate: float = 0.05) -> list[float]:
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=learning_rate)
    handle.model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(handle.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    handle.model.eval()
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged_except(model: nn.Module, before: dict[str, torch.Tensor],
                            allowed_prefixes: tuple[str, ...] = ()) -> None:
    """Every base tensor bit-identical, except those under `allowed_prefixes`."""
    after = model.state_dict()
    for name, tensor in before.items():
        if name.startswith(allowed_prefixes):
            continue
        assert torch.equal(after[name], tensor), f"base weight {name} changed"


def lm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def cls_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits


def peft_lm_logits(peft_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's causal-LM logits on the real positions (it also returns the virtual ones)."""
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1]:]


def perturb_trainable(peft_model: nn.Module, seed: int = 3, scale: float = 0.5) -> None:
    """Moves every trainable PEFT parameter away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def assert_greedy_generation_matches_full_forward(model: nn.Module, input_ids: torch.Tensor,
                                                  new_tokens: int = 4) -> torch.Tensor:
    """Cached greedy generation: each step's logits and token equal an uncached forward over
    the whole sequence so far. Returns the generated tokens."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    sequence = input_ids
    for step in range(new_tokens):
        with torch.no_grad():
            full = model(input_ids=sequence, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], full, atol=TOLERANCE, rtol=0)
        sequence = torch.cat([sequence, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)
    return out.sequences[:, input_ids.shape[1]:]


def assert_left_padding_invariant(model: nn.Module, new_tokens: int = 3) -> None:
    """A left-padded row generates exactly what it generates alone (the virtual tokens go
    before the padding and real positions are counted without it)."""
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    alone = model.generate(ids[1:, 2:], attention_mask=mask[1:, 2:], max_new_tokens=new_tokens,
                           do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
    assert torch.equal(batched.sequences[1, 4:], alone.sequences[0, 2:])
    for step_batched, step_alone in zip(batched.logits, alone.logits):
        torch.testing.assert_close(step_batched[1], step_alone[0], atol=TOLERANCE, rtol=0)


def assert_we_load_peft_adapter(peft_config_class, task: str, tmp_path, **options) -> torch.Tensor:
    """A PEFT adapter (trainable tensors perturbed) saved by PEFT loads in deltatune with the
    same logits, on the tiny Llama (`task="causal"`) or the tiny BERT classifier. Returns them."""
    import peft

    from deltatune.methods.adapter_io import load_adapter
    from tests.conftest import tiny_bert, tiny_llama

    make, logits_of = (tiny_llama, lm_logits) if task == "causal" else (tiny_bert, cls_logits)
    batch = causal_lm_batch() if task == "causal" else classification_batch()
    task_type = "CAUSAL_LM" if task == "causal" else "SEQ_CLS"
    peft_model = peft.get_peft_model(make(), peft_config_class(task_type=task_type,
                                                               **options)).eval()
    perturb_trainable(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    expected = (peft_lm_logits(peft_model, batch) if task == "causal"
                else cls_logits(peft_model, batch))
    model = make()
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits_of(model, batch), expected, atol=TOLERANCE, rtol=0)
    assert (expected - logits_of(make(), batch)).abs().max() > 1e-3  # the adapter is in effect
    return expected


def assert_generation_matches_peft(model: nn.Module, handle: MethodHandle, tmp_path) -> None:
    """After a few training steps, cached greedy generation equals an uncached forward, and
    PEFT, loading the saved adapter, generates the same tokens."""
    import peft

    from deltatune.methods.adapter_io import save_adapter
    from tests.conftest import tiny_llama

    train_steps(handle, causal_lm_loss, causal_lm_batch(), steps=3)
    input_ids = causal_lm_batch()["input_ids"][:, :6]
    tokens = assert_greedy_generation_matches_full_forward(model, input_ids)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    peft_out = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=tokens.shape[1], do_sample=False)
    assert torch.equal(peft_out[:, -tokens.shape[1]:], tokens)


def assert_peft_loads_our_adapter(model: nn.Module, handle: MethodHandle, task: str,
                                  tmp_path) -> None:
    """After a few training steps, PEFT loads the adapter deltatune saved (on a fresh tiny
    Llama for `task="causal"`, a fresh tiny BERT classifier otherwise) and gives its logits."""
    import peft

    from deltatune.methods.adapter_io import save_adapter
    from tests.conftest import tiny_bert, tiny_llama

    causal = task == "causal"
    batch = causal_lm_batch() if causal else classification_batch()
    train_steps(handle, causal_lm_loss if causal else classification_loss, batch, steps=3)
    save_adapter(handle, tmp_path)
    base = tiny_llama() if causal else tiny_bert()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    expected = peft_lm_logits(peft_model, batch) if causal else cls_logits(peft_model, batch)
    actual = lm_logits(model, batch) if causal else cls_logits(model, batch)
    torch.testing.assert_close(expected, actual, atol=TOLERANCE, rtol=0)
