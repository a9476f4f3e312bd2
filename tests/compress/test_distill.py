"""Word-level distillation on tiny models: the KD term equals a KL computed by hand (causal LM at
labelled next-token positions, classifier per example), its gradient reaches only the student and
lowers the KL when trained; the teacher cache reproduces online KD when it keeps the whole
vocabulary, computes the documented top-k + remainder KL otherwise, is found by any batch
composition, is reused without running the teacher and refuses rows it lacks; different
vocabularies are refused."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deltatune.compress.distill import (TeacherCache, WordLevelKD, check_same_vocabulary,
                                        row_keys)
from deltatune.data.collate import pad_batch
from deltatune.errors import ConfigError
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from tests.conftest import tiny_bert, tiny_llama

VOCAB = 128


def _examples(count: int = 5, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 6 + 2 * index
        input_ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        prompt = 3 + index % 2
        examples.append({"input_ids": input_ids,
                         "labels": [-100] * prompt + input_ids[prompt:]})
    return examples


def _class_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(3, VOCAB, (4 + row,), generator=generator).tolist(),
                 "label": row % 3} for row in range(4)]
    return pad_batch(examples, pad_token_id=0)


def _classifier(seed: int) -> torch.nn.Module:
    """A tiny BERT classifier whose head gives logits far apart (the init's are all near 0)."""
    model = tiny_bert(seed=seed, num_labels=3)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)
    return model


def _hand_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    return float((p * (p.log() - q.log())).sum())


def _hand_causal_kd(teacher, student, batch, temperature: float) -> float:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits, student_logits = teacher(**inputs).logits, student(**inputs).logits
    total, positions = 0.0, 0
    rows, length = batch["input_ids"].shape
    for row in range(rows):
        for position in range(length - 1):
            if batch["labels"][row, position + 1] != -100:
                total += _hand_kl(teacher_logits[row, position], student_logits[row, position],
                                  temperature)
                positions += 1
    return total * temperature ** 2 / positions


def test_causal_kd_equals_a_hand_computed_kl_and_adds_with_its_weight():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = pad_batch(_examples(), pad_token_id=0)
    kd = WordLevelKD(teacher, temperature=2.0, weight=0.25)
    output = CausalLMObjective([kd])(student, batch)
    expected = _hand_causal_kd(teacher, student, batch, 2.0)
    assert expected > 0.01
    assert output.terms["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert output.loss.item() == pytest.approx(output.terms["ce"].item() + 0.25 * expected,
                                               rel=1e-5)
    alone = CausalLMObjective()(student, batch).loss.item()
    assert output.terms["ce"].item() == pytest.approx(alone, abs=1e-6)


def test_kd_of_a_model_with_itself_is_zero():
    student = tiny_llama(seed=0)
    batch = pad_batch(_examples(), pad_token_id=0)
    output = CausalLMObjective([WordLevelKD(tiny_llama(seed=0))])(student, batch)
    assert abs(output.terms["kd"].item()) < 1e-6


def test_classifier_kd_equals_a_hand_computed_kl_per_example():
    student, teacher = _classifier(0), _classifier(1)
    batch = _class_batch()
    output = ClassificationObjective([WordLevelKD(teacher, temperature=3.0)])(student, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits, student_logits = teacher(**inputs).logits, student(**inputs).logits
    expected = sum(_hand_kl(teacher_logits[row], student_logits[row], 3.0)
                   for row in range(4)) * 9.0 / 4
    assert expected > 1e-4
    assert output.terms["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_only_the_student_and_the_teacher_stays_in_eval_mode():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    student.train()
    teacher.train()
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    batch = pad_batch(_examples(), pad_token_id=0)
    kd = WordLevelKD(teacher)
    output = CausalLMObjective([kd])(student, batch)
    output.terms["kd"].backward()
    assert modes == [False]
    assert all(parameter.grad is None for parameter in teacher.parameters())
    student_gradients = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_gradients and sum(float(g.abs().sum()) for g in student_gradients) > 0


def test_training_on_the_kd_term_brings_the_student_to_the_teacher():
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = pad_batch(_examples(), pad_token_id=0)
    objective = CausalLMObjective([WordLevelKD(teacher, temperature=1.0, weight=1.0)])
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    values = []
    for _ in range(15):
        output = objective(student, batch)
        values.append(output.terms["kd"].item())
        optimizer.zero_grad()
        output.terms["kd"].backward()
        optimizer.step()
    assert values[-1] < 0.5 * values[0]


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_cache_over_the_whole_vocabulary_equals_online_kd(tmp_path, kind):
    if kind == "causal":
        student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
        batch, objective = pad_batch(_examples(), pad_token_id=0), CausalLMObjective
    else:
        student, teacher = _classifier(0), _classifier(1)
        batch, objective = _class_batch(), ClassificationObjective
    cache = TeacherCache.build(teacher, [batch], tmp_path / "cache", temperature=2.0,
                               top_k=VOCAB)
    assert cache.top_k == (VOCAB if kind == "causal" else 3) and cache.rest_log_probs is None
    results = []
    for kd in (WordLevelKD(teacher), WordLevelKD(None, cache=cache)):
        student.zero_grad()
        value = objective([kd])(student, batch).terms["kd"]
        value.backward()
        results.append((value.item(), [p.grad.clone() for p in student.parameters()
                                       if p.grad is not None]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5) and results[0][0] > 1e-4
    for online, cached in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(cached, online, atol=1e-6, rtol=1e-4)


def test_top_k_cache_is_the_kl_over_top_k_plus_a_remainder_bucket(tmp_path):
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = pad_batch(_examples(), pad_token_id=0)
    temperature, k = 2.0, 5
    cache = TeacherCache.build(teacher, [batch], tmp_path, temperature=temperature, top_k=k)
    cached = CausalLMObjective([WordLevelKD(None, temperature, cache=cache)])(
        student, batch).terms["kd"].item()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        p = torch.softmax(teacher(**inputs).logits.double() / temperature, -1)
        q = torch.softmax(student(**inputs).logits.double() / temperature, -1)
    mask = batch["labels"][:, 1:] != -100
    p, q = p[:, :-1][mask], q[:, :-1][mask]
    top = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(1, top), q.gather(1, top)
    p_rest, q_rest = 1 - p_top.sum(1), 1 - q_top.sum(1)
    expected = ((p_top * (p_top / q_top).log()).sum(1) + p_rest * (p_rest / q_rest).log())
    expected = float(expected.mean()) * temperature ** 2
    assert cached == pytest.approx(expected, rel=1e-4)
    full = _hand_causal_kd(teacher, student, batch, temperature)
    assert 0 < cached < full  # a coarse-grained KL never exceeds the full one


def test_cache_rows_are_found_in_any_order_composition_and_padding(tmp_path):
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    examples = _examples(6)
    cache = TeacherCache.build(teacher, examples, tmp_path, top_k=VOCAB, batch_size=4)
    assert len(cache) == 6
    reordered = pad_batch([examples[5], examples[1], examples[3]], pad_token_id=7)
    # Built in batches [0..3] (width 12) and [4, 5]; here examples 1 and 3 are padded to 16.
    assert reordered["input_ids"].shape[1] == 16
    online = CausalLMObjective([WordLevelKD(teacher)])(student, reordered).terms["kd"].item()
    cached = CausalLMObjective([WordLevelKD(None, cache=TeacherCache.open(tmp_path))])(
        student, reordered).terms["kd"].item()
    assert cached == pytest.approx(online, rel=1e-5)
    # Different padding of the same row gives the same key.
    wide = pad_batch([examples[0], examples[5]], pad_token_id=0)
    narrow = pad_batch([examples[0]], pad_token_id=0)
    assert row_keys(wide)[0] == row_keys(narrow)[0] != row_keys(wide)[1]


def test_second_build_reuses_the_files_without_running_the_teacher(tmp_path):
    teacher = tiny_llama(seed=1)
    calls = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(1))
    batches = [pad_batch(_examples(3), 0), pad_batch(_examples(3, seed=1), 0)]
    first = TeacherCache.build(teacher, batches, tmp_path, top_k=8)
    assert len(calls) == 2
    written = (tmp_path / "teacher_cache.safetensors").stat().st_mtime_ns
    again = TeacherCache.build(teacher, list(reversed(batches)), tmp_path, top_k=8)
    subset = TeacherCache.build(teacher, batches[:1], tmp_path, top_k=8)
    assert len(calls) == 2 and len(again) == len(subset) == len(first) == 6
    assert (tmp_path / "teacher_cache.safetensors").stat().st_mtime_ns == written
    assert (again.description["top_k"], again.description["temperature"]) == (8, 2.0)
    TeacherCache.build(teacher, batches, tmp_path, top_k=4)  # new settings: built again
    assert len(calls) == 4 and TeacherCache.open(tmp_path).top_k == 4
    fingerprint = TeacherCache.open(tmp_path).description["teacher_fingerprint"]
    other_teacher = tiny_llama(seed=2)
    other_teacher.register_forward_hook(lambda module, args, output: calls.append(2))
    rebuilt = TeacherCache.build(other_teacher, batches, tmp_path, top_k=4)
    assert calls[4:] == [2, 2] and rebuilt.description["teacher_fingerprint"] != fingerprint


def test_a_row_missing_from_the_cache_says_to_rebuild_it(tmp_path):
    cache = TeacherCache.build(tiny_llama(seed=1), _examples(2), tmp_path, top_k=8)
    other = pad_batch(_examples(2, seed=5), pad_token_id=0)
    with pytest.raises(ConfigError, match="rebuild it with TeacherCache.build"):
        CausalLMObjective([WordLevelKD(None, cache=cache)])(tiny_llama(), other)


def test_cache_settings_must_agree_with_the_term(tmp_path):
    cache = TeacherCache.build(tiny_llama(seed=1), _examples(2), tmp_path, temperature=2.0)
    with pytest.raises(ConfigError, match="temperature 2.0"):
        WordLevelKD(None, temperature=4.0, cache=cache)
    with pytest.raises(ConfigError, match="needs a teacher"):
        WordLevelKD(None)
    with pytest.raises(ConfigError, match="holds no teacher cache"):
        TeacherCache.open(tmp_path / "absent")


def _tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    model = models.WordLevel({word: index for index, word in enumerate(words)},
                             unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", eos_token="</s>")


def test_a_teacher_with_another_vocabulary_is_refused():
    base = ["<unk>", "<pad>", "</s>", "cat", "dog"]
    check_same_vocabulary(_tokenizer(base), _tokenizer(list(base)))
    with pytest.raises(ConfigError, match=r"must share a tokenizer: vocabulary sizes 6 .*"
                                          r"'bird' \(teacher id 5, student id None\)"):
        check_same_vocabulary(_tokenizer(base + ["bird"]), _tokenizer(base))
    with pytest.raises(ConfigError, match=r"'cat' \(teacher id 4, student id 3\)"):
        check_same_vocabulary(_tokenizer(["<unk>", "<pad>", "</s>", "dog", "cat"]),
                              _tokenizer(base))


def test_teacher_logits_of_another_size_are_refused_at_the_first_call():
    batch = pad_batch(_examples(2), pad_token_id=0)
    kd = WordLevelKD(tiny_llama(seed=1, vocab_size=VOCAB + 32))
    with pytest.raises(ConfigError, match="160 classes/tokens per position and the student 128"):
        CausalLMObjective([kd])(tiny_llama(), batch)


def test_a_teacher_on_another_device_is_refused():
    kd = WordLevelKD(tiny_llama(seed=1).to("meta"))
    with pytest.raises(ConfigError, match="move the teacher to the student's device"):
        CausalLMObjective([kd])(tiny_llama(), pad_batch(_examples(2), pad_token_id=0))


def test_packed_batches_are_refused_by_the_cache(tmp_path):
    from deltatune.data.packing import collate_packed, pack_examples
    cache = TeacherCache.build(tiny_llama(seed=1), _examples(2), tmp_path, top_k=8)
    packed = collate_packed(pack_examples(_examples(2)), pad_token_id=0)
    with pytest.raises(ConfigError, match="switch packing off"):
        cache.lookup(packed)


def test_nothing_labelled_gives_a_zero_kd_that_backpropagates():
    student = tiny_llama()
    batch = pad_batch(_examples(2), pad_token_id=0)
    batch["labels"][:] = -100
    output = CausalLMObjective([WordLevelKD(tiny_llama(seed=1))])(student, batch)
    assert output.terms["kd"].item() == 0.0
    output.loss.backward()


def test_kd_on_a_plain_function_objective_without_logits_says_what_to_use():
    from deltatune.train.objectives import ObjectiveOutput
    kd = WordLevelKD(tiny_llama(seed=1))
    output = ObjectiveOutput(torch.tensor(0.0), 1, 1)
    with pytest.raises(ConfigError, match="CausalLMObjective or ClassificationObjective"):
        kd(tiny_llama(), pad_batch(_examples(1), 0), output)


def test_kd_rejects_bad_settings():
    with pytest.raises(ConfigError, match="temperature must be positive"):
        WordLevelKD(tiny_llama(), temperature=0)
    with pytest.raises(ConfigError, match="weight must be zero or more"):
        WordLevelKD(tiny_llama(), weight=-1)
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        TeacherCache.build(tiny_llama(), _examples(1), "unused", top_k=0)


def test_teacher_fingerprint_sees_a_one_column_change():
    from deltatune.compress.distill import model_fingerprint
    model = tiny_llama(seed=1)
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_llama(seed=1)) == before != model_fingerprint(tiny_llama(2))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 3] += 1e-3
    assert model_fingerprint(model) != before
