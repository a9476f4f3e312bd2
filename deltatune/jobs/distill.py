"""`deltatune distill`: train a student model from a teacher (a model, or a trained run with its
adapter merged), by one of the approaches of Kim & Rush (2016):

- `none`: the student on the data's labels alone (the baseline every KD number is read against);
- `word`: cross-entropy on the data plus `kd_weight` × the temperature-softened KL to the
  teacher's distribution at every target position (logit KD for classifiers); with `top_k` the
  teacher's top-k probabilities are computed once into `teacher_cache/` and the teacher leaves
  memory before the student trains;
- `seq`: the teacher's beam-search output replaces each training response (`teacher_generations/`
  caches it, so a rerun does not generate again);
- `seq-inter`: of the teacher's beam candidates, the one closest to the reference (sentence BLEU
  or token F1).

The student is a model the user names (it must share the teacher's tokenizer for word-level KD),
or one cut from the teacher by removing layers (ShortGPT block influence on a calibration
sample): "prune, then distill". A folder `deltatune prune` wrote is a student too. The student
trains as an ordinary run in `student/` (any adaptation method, `full` by default); the
distilled model is written to `model/`, loaded back and made to generate; `summary.json` and
`curve.png` (the student's training loss and its terms) complete the run directory."""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.data import DataConfig, build_datasets
from deltatune.data.dataset import load_records
from deltatune.errors import ConfigError
from deltatune.eval.config import EvalConfig
from deltatune.fileio import write_json
from deltatune.jobs.compression_run import (FolderArtifacts, folder_bytes, log_stage,
                                             measure_model, padded_batches,
                                             start_output_folder)
from deltatune.jobs.pruners import PROVENANCE_FILE
from deltatune.jobs.sources import DenseSource, load_dense_source, say, source_data
from deltatune.jobs.summary import rounded
from deltatune.quant.precision import cpu_name
from deltatune.train.config import TrainConfig

KINDS = ("none", "word", "seq", "seq-inter")
SEQUENCE_MODES = {"seq": "seq-kd", "seq-inter": "seq-inter"}  # deltatune.compress.sequence_kd
# Kept by --overwrite: what a rerun reuses instead of recomputing.
CACHES = ("teacher_cache", "teacher_generations")


@dataclass
class DistillRequest:
    teacher: str                          # model name / folder / hub id, or a run directory
    out: str
    kind: str = "word"
    student: str | None = None            # a model name or folder (e.g. from `deltatune prune`)
    student_layers: int | None = None     # or: the teacher cut to this many layers
    task: str | None = None               # a model teacher's task (a run has its own)
    data: DataConfig | None = None        # None: the teacher run's data
    method: str = "full"                  # how the student trains
    method_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5))
    eval: EvalConfig = field(default_factory=EvalConfig)
    temperature: float = 2.0
    kd_weight: float = 1.0
    top_k: int = 0                        # > 0: cache the teacher's top-k, teacher offline
    beams: int = 4
    max_new_tokens: int = 64
    generation_batch_size: int = 8
    interpolation_metric: str = "bleu"
    calibration_examples: int = 128
    # Where the teacher caches live (None: inside `out`); runs that share it share the work.
    cache_dir: str | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False


def distill_saved(request: DistillRequest) -> dict[str, Any]:
    """Runs the distillation; returns the summary (also written to summary.json)."""
    _check_request(request)
    out = start_output_folder(request.out, request.overwrite, _config(request), keep=CACHES)
    teacher = load_dense_source(request.teacher, request.task, request.trust_remote_code)
    data = source_data(teacher, request.teacher, request.data, request.seed, "distillation")
    datasets = build_datasets(data, teacher.loaded.tokenizer, teacher.task.encoding,
                              request.seed)
    say("evaluating the teacher")
    teacher_stage = {"metrics": _evaluate(teacher, datasets), **_measure(teacher, datasets,
                                                                         request)}
    log_stage(out, {"stage": "teacher", **_flat(teacher_stage)})
    student_model = _student_init(request, teacher, datasets, out)
    student_data = data
    generation_info = None
    if request.kind in SEQUENCE_MODES:
        student_data, generation_info = _sequence_kd_data(request, teacher, data, out)
    additions = _additions(request, teacher, datasets, out)
    if request.top_k and request.kind == "word":
        teacher.loaded.model = None  # the cache holds what the student needs
        gc.collect()
    summary = _train_student(request, student_model, teacher.task.name, student_data,
                             additions, out)
    model_folder, sample = _save_student(request, teacher, out, _sample_prompt(datasets))
    student = load_dense_source(str(model_folder), teacher.task.name)
    student_stage = {"metrics": summary.final_metrics,
                     **_measure(student, datasets, request),
                     "bytes_on_disk": folder_bytes(model_folder)}
    log_stage(out, {"stage": "student", **_flat(student_stage)})
    result = rounded({
        "teacher": request.teacher, "student": request.student or
        f"teacher cut to {request.student_layers} layers", "kind": request.kind,
        "task": teacher.task.name, "method": request.method,
        "settings": _kind_settings(request), "teacher_stage": teacher_stage,
        "student_before_training": summary.baseline_metrics, "student_stage": student_stage,
        "train_steps": summary.steps, "train_seconds": summary.train_wall_seconds,
        "final_train_loss": summary.final_train_loss,
        "final_train_loss_terms": summary.final_train_loss_terms,
        "sequence_kd": generation_info, "sample_generation": sample,
        "model_folder": str(model_folder), "cpu": cpu_name(),
        "threads": torch.get_num_threads()})
    write_json(out / "summary.json", result)
    _plot(out, request)
    say(f"run directory: {out}")
    return result


def _check_request(request: DistillRequest) -> None:
    if request.kind not in KINDS:
        raise ConfigError(f"--kind {request.kind!r}: choose one of {', '.join(KINDS)}")
    if (request.student is None) == (request.student_layers is None):
        raise ConfigError("say which student: --student MODEL_OR_FOLDER, or --student-layers K "
                          "(the teacher cut to K layers)")
    if request.student_layers is not None and request.student_layers < 1:
        raise ConfigError("--student-layers must be at least 1")
    if request.temperature <= 0:
        raise ConfigError("--temperature must be positive (1 = the teacher's own distribution)")
    if request.kind != "word" and request.top_k:
        raise ConfigError("--top-k caches the teacher for word-level KD only; drop it or use "
                          "--kind word")


def _config(request: DistillRequest) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(request), default=str))


def _evaluate(source: DenseSource, datasets) -> dict[str, Any]:
    evaluator = source.task.evaluator(source.loaded, datasets.eval, dict(datasets.info),
                                      EvalConfig(baseline=False), False)
    return evaluator()


def _measure(source: DenseSource, datasets, request: DistillRequest) -> dict[str, Any]:
    return measure_model(source.loaded.model, datasets.eval, request.eval.batch_size,
                         source.loaded.tokenizer.pad_token_id)


def _flat(stage: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in stage.items() if k != "metrics"}
    flat.update({f"eval_{k}": v for k, v in (stage["metrics"] or {}).items()})
    return flat


def _student_init(request: DistillRequest, teacher: DenseSource, datasets, out: Path) -> str:
    """The student's starting weights: the named model, or the teacher minus its layers of
    lowest block influence, saved as a model folder."""
    if request.student is not None:
        return request.student
    from deltatune.compress.layers import remove_layers_by
    from deltatune.models.pruned import save_pruned
    from deltatune.models.structure import transformer_blocks
    model = copy.deepcopy(teacher.loaded.model)
    layers = len(transformer_blocks(model))
    if request.student_layers >= layers:
        raise ConfigError(f"--student-layers {request.student_layers}: the teacher has only "
                          f"{layers} layers; choose fewer")
    calibration = padded_batches(datasets.train[:request.calibration_examples], 16,
                                 teacher.loaded.tokenizer.pad_token_id)
    say(f"cutting the student: {layers} -> {request.student_layers} layers (block influence)")
    result = remove_layers_by(model, calibration, layers - request.student_layers,
                              by="block-influence")
    folder = out / "student_init"
    save_pruned(model, teacher.loaded.tokenizer, folder,
                extra_json={PROVENANCE_FILE: {"source": request.teacher,
                                              "pruning": dataclasses.asdict(result)}})
    _save_task_artifacts(teacher, datasets, folder)
    del model
    return str(folder)


def _save_task_artifacts(source: DenseSource, datasets, folder: Path) -> None:
    if source.is_run:
        source.task.save_artifacts(FolderArtifacts(folder), dict(datasets.info))


def _sequence_kd_data(request: DistillRequest, teacher: DenseSource, data: DataConfig,
                      out: Path) -> tuple[DataConfig, dict[str, Any]]:
    """Training records whose responses are the teacher's (best beam, or closest candidate),
    written as JSONL files; the evaluation records stay the references."""
    from deltatune.compress.sequence_kd import (prompt_ids_for, sequence_kd_records,
                                                teacher_generations)
    if not teacher.task.models_language or teacher.task.encoding.name != "instruction":
        raise ConfigError(f"sequence-level KD needs instruction data (task causal-lm), not "
                          f"task '{teacher.task.name}'; use --kind word")
    train_records, eval_records = load_records(data, teacher.task.encoding, request.seed)
    tokenizer = teacher.loaded.tokenizer
    prompts = prompt_ids_for(train_records, tokenizer, data.template)
    say(f"teacher beam search ({request.beams} beams) on {len(prompts)} training prompts")
    generations = teacher_generations(teacher.loaded.model, tokenizer, prompts,
                                      num_beams=request.beams,
                                      max_new_tokens=request.max_new_tokens,
                                      batch_size=request.generation_batch_size,
                                      cache_folder=_cache_root(request, out)
                                      / "teacher_generations",
                                      progress=request.progress)
    mode = SEQUENCE_MODES[request.kind]
    records = sequence_kd_records(train_records, generations, mode=mode,
                                  metric=request.interpolation_metric)
    changed = sum(new != old for new, old in zip(records, train_records))
    train_path, eval_path = out / "seq_kd_train.jsonl", out / "seq_kd_eval.jsonl"
    _write_jsonl(train_path, records)
    _write_jsonl(eval_path, eval_records)
    student_data = dataclasses.replace(data, train=str(train_path), eval=str(eval_path),
                                       builtin=None, columns={}, eval_columns=None,
                                       train_limit=None, eval_limit=None, placeholders={})
    return student_data, {"prompts": len(prompts), "responses_changed": changed,
                          "beams": request.beams, "max_new_tokens": request.max_new_tokens,
                          "mode": request.kind, "metric": request.interpolation_metric
                          if request.kind == "seq-inter" else None}


def _cache_root(request: DistillRequest, out: Path) -> Path:
    return Path(request.cache_dir) if request.cache_dir else out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from deltatune.fileio import write_text
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                             for record in records))


def _additions(request: DistillRequest, teacher: DenseSource, datasets, out: Path):
    from deltatune.jobs.run import TrainingAdditions
    if request.kind != "word":
        return TrainingAdditions()
    from deltatune.compress.distill import TeacherCache, WordLevelKD, check_same_vocabulary
    cache = None
    if request.top_k:
        say(f"caching the teacher's top-{request.top_k} probabilities")
        batches = padded_batches(datasets.train, request.train.batch_size,
                                 teacher.loaded.tokenizer.pad_token_id)
        cache = TeacherCache.build(teacher.loaded.model, batches,
                                   _cache_root(request, out) / "teacher_cache",
                                   temperature=request.temperature, top_k=request.top_k,
                                   progress=request.progress)
    teacher_model = None if cache is not None else teacher.loaded.model
    teacher_tokenizer = teacher.loaded.tokenizer

    def terms(job):
        check_same_vocabulary(teacher_tokenizer, job.loaded.tokenizer)
        return [WordLevelKD(teacher_model, temperature=request.temperature,
                            weight=request.kd_weight, cache=cache)]
    return TrainingAdditions(terms=terms)


def _train_student(request: DistillRequest, student: str, task_name: str, data: DataConfig,
                   additions, out: Path):
    from deltatune.jobs.run import run_training
    from deltatune.spec import RunSpec
    # Word-level KD matches the teacher row by row: packed rows would mix examples.
    train = dataclasses.replace(request.train, packing=request.train.packing
                                and request.kind != "word")
    spec = RunSpec(model=student, task=task_name, method=request.method,
                   method_options=request.method_options, data=data, train=train,
                   eval=request.eval, seed=request.seed, output_dir=str(out / "student"),
                   progress=request.progress)
    say(f"training the student ({request.kind} distillation, method {request.method})")
    return run_training(spec, overwrite=True, trust_remote_code=request.trust_remote_code,
                        additions=additions)


def _save_student(request: DistillRequest, teacher: DenseSource, out: Path,
                  prompt: list[int] | None) -> tuple[Path, str | None]:
    """The trained student merged into one model folder, read back and made to generate."""
    from deltatune.models.pruned import save_pruned
    trained = load_dense_source(str(out / "student"), trust_remote_code=request.trust_remote_code)
    folder = out / "model"
    save_pruned(trained.loaded.model, trained.loaded.tokenizer, folder,
                extra_json={PROVENANCE_FILE: {"distilled_from": request.teacher,
                                              "kind": request.kind,
                                              "settings": _kind_settings(request)}})
    if trained.is_run:
        labels = trained.task.saved_labels(out / "student")
        if labels:
            write_json(folder / "labels.json", {"label_names": labels})
    del trained
    sample = _sample_generation(folder, prompt) if teacher.task.models_language else None
    return folder, sample


def _sample_prompt(datasets) -> list[int] | None:
    """The first evaluation example's prompt (instruction data) or its first 16 tokens."""
    if not datasets.eval:
        return None
    example = datasets.eval[0]
    return list(example.get("prompt_ids") or example["input_ids"][:16])


def _sample_generation(folder: Path, prompt: list[int] | None) -> str | None:
    """Greedy continuation of `prompt` by the saved model, loaded back from its folder."""
    if not prompt:
        return None
    from deltatune.models import load_model
    loaded = load_model(str(folder))
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        output = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=16, do_sample=False,
                                       pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def _kind_settings(request: DistillRequest) -> dict[str, Any]:
    if request.kind == "word":
        return {"temperature": request.temperature, "kd_weight": request.kd_weight,
                "top_k_cache": request.top_k or None}
    if request.kind in ("seq", "seq-inter"):
        return {"beams": request.beams, "max_new_tokens": request.max_new_tokens}
    return {}


def _plot(out: Path, request: DistillRequest) -> None:
    from deltatune.report.curves import Series, plot_curves
    records = [json.loads(line) for line in
               (out / "student" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    series = [Series("training loss", [(r["step"], r["loss"]) for r in steps])]
    for key in sorted({k for r in steps for k in r if k.startswith("loss_")}):
        series.append(Series(key.replace("loss_", "term "), [(r["step"], r.get(key))
                                                             for r in steps]))
    plot_curves(series, out / "curve.png", x_label="step", y_label="loss",
                title=f"student training, {request.kind} distillation")
