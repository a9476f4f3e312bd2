"""Training speed and memory: deltatune against transformers + PEFT, side by side.

One command runs every side in its own subprocess (so each side's peak RSS is its own), in
alternating order A/B/A/B over `--repeats` rounds (so machine drift hits every side alike), on
the same model, LoRA settings, initial LoRA weights, optimizer, learning rate, seed, batches and
real tokens. Sides:

  peer          transformers + PEFT as their docs show: get_peft_model(LoraConfig(...)), AdamW,
                per-batch padding (DataCollatorForSeq2Seq), SDPA, model(**batch).loss
  peer-flat     the same with transformers' padding-free collator (DataCollatorWithFlattening,
                position_ids, no attention mask; use_cache=False or transformers skips its
                packed-sequence mask)
  deltatune     deltatune LoRA + packing (one row per batch) + packed attention + chunked CE
  dt-*          ablations of deltatune, one technique off or on (see VARIANTS)

Workloads (smollm2-135m, fp32, CPU): "fixed" = batches of 4 x 256 random tokens, loss on every
token; "alpaca" = the Alpaca demo data, Alpaca template, natural lengths up to 512, batches of 8
examples, loss on responses only. "sst2" (minilm-l6 encoder + new 2-class head, LoRA r=8 alpha 16
on query/value, lr 1e-3, the SST-2 training sentences in order, batches of 32, max length 64,
dropout on as in any real run): the peer is PEFT + a plain PyTorch loop with
DataCollatorWithPadding; deltatune packs each batch's sentences into one row. Reports real (non-padding) tokens/s, peak RSS, MFU (useful model
FLOPs per second, see ModelFlops, over the fp32 matmul peak measured at the start and the end of
the run), the ratio
to the peer, and the loss curves. Example:

    python benchmarks/train_speed.py --workload all --steps 12 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LEARNING_RATE, SEED = 16, 32, 2e-4, 0
# Matmul shapes (m, k, n) of this model's step whose best fp32 rate is taken as the machine's
# peak for MFU (measured at the start and the end of every run, same threads as the sides).
PEAK_SHAPES = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 2048, 2048)]
WORKLOADS = {"fixed": {"batch": 4, "length": 256}, "alpaca": {"batch": 8, "max_length": 512},
             "sst2": {"batch": 32, "max_length": 64}}
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
ENCODER, ENCODER_RANK, ENCODER_ALPHA, ENCODER_LR = "minilm-l6", 8, 16, 1e-3
ENCODER_TARGETS = ["query", "value"]


@dataclass
class Variant:
    """How a side trains. `packing`: None (per-batch padding), "flat" (one row per batch) or
    "rows" (rows of the workload's max length)."""
    library: str  # "peft" or "deltatune"
    packing: str | None = None
    packed_attention: bool = False
    chunked_loss: bool = False
    checkpointing: bool = False
    compile: bool = False
    fused_mlp: bool = True
    flatten_collator: bool = False
    allocator: str = "reuse"  # deltatune's CPU allocator policy (see deltatune/train/speed.py)
    # deltatune's default: threads = the cores other processes leave free (train/threads.py).
    adaptive_threads: bool = False
    # Frozen base: a deltatune.quant format (deltatune sides) or bitsandbytes NF4 + double quant
    # (peer sides, quantize="bnb-nf4"), and the precision it computes in (fp32 or bf16).
    quantize: str | None = None
    base_dtype: str = "fp32"


VARIANTS = {
    "peer": Variant("peft", allocator="system"),
    "peer-flat": Variant("peft", flatten_collator=True, allocator="system"),
    # Not the peer as its docs show it: the peer given deltatune's allocator policy, to separate
    # what the allocator alone buys from what deltatune's training path buys.
    "peer-reuse": Variant("peft", allocator="reuse"),
    "deltatune": Variant("deltatune", packing="flat", packed_attention=True, chunked_loss=True,
                         adaptive_threads=True),
    "dt-fixed-threads": Variant("deltatune", packing="flat", packed_attention=True,
                                chunked_loss=True),
    "dt-padded": Variant("deltatune", packing=None, chunked_loss=True),
    "dt-full-logits": Variant("deltatune", packing="flat", packed_attention=True),
    "dt-hf-mask": Variant("deltatune", packing="flat", chunked_loss=True),
    "dt-unfused-mlp": Variant("deltatune", packing="flat", packed_attention=True,
                              chunked_loss=True, fused_mlp=False),
    "dt-rows": Variant("deltatune", packing="rows", packed_attention=True, chunked_loss=True),
    "dt-plain": Variant("deltatune", allocator="system"),
    "dt-checkpointing": Variant("deltatune", packing="flat", packed_attention=True,
                                chunked_loss=True, checkpointing=True),
    "dt-compile": Variant("deltatune", packing="flat", packed_attention=True, chunked_loss=True,
                          compile=True),
    "dt-system-malloc": Variant("deltatune", packing="flat", packed_attention=True,
                                chunked_loss=True, allocator="system"),
    "dt-release-malloc": Variant("deltatune", packing="flat", packed_attention=True,
                                 chunked_loss=True, allocator="release"),
    # QLoRA and the low-precision base (issue: quantization). The peer's QLoRA is transformers'
    # BitsAndBytesConfig(load_in_4bit, nf4, double quant) + PEFT, as the PEFT docs show it.
    "peer-qlora": Variant("peft", allocator="system", quantize="bnb-nf4"),
    "peer-qlora-bf16": Variant("peft", allocator="system", quantize="bnb-nf4", base_dtype="bf16"),
    "peer-bf16": Variant("peft", allocator="system", base_dtype="bf16"),
    "dt-qlora": Variant("deltatune", packing="flat", packed_attention=True, chunked_loss=True,
                        adaptive_threads=True, quantize="nf4"),
    "dt-qlora-bf16": Variant("deltatune", packing="flat", packed_attention=True,
                             chunked_loss=True, adaptive_threads=True, quantize="nf4",
                             base_dtype="bf16"),
    "dt-qlora-bf16-release": Variant("deltatune", packing="flat", packed_attention=True,
                                     chunked_loss=True, adaptive_threads=True, quantize="nf4",
                                     base_dtype="bf16", allocator="release"),
    "dt-qlora-bf16-ckpt": Variant("deltatune", packing="flat", packed_attention=True,
                                  chunked_loss=True, adaptive_threads=True, quantize="nf4",
                                  base_dtype="bf16", checkpointing=True),
    "dt-bf16": Variant("deltatune", packing="flat", packed_attention=True, chunked_loss=True,
                       adaptive_threads=True, base_dtype="bf16"),
}


# Sides the sst2 workload has (the LM ablations do not apply to an encoder).
CLASSIFICATION_SIDES = ("peer", "peer-reuse", "deltatune", "dt-fixed-threads", "dt-padded",
                        "dt-system-malloc")


@dataclass
class SideResult:
    side: str
    workload: str
    step_seconds: list[float]
    losses: list[float]
    real_tokens: list[int]
    computed_tokens: list[int]
    peak_rss_bytes: int
    setup_rss_bytes: int
    threads: int
    model_flops: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def tokens_per_second(self, warmup: int) -> float:
        return sum(self.real_tokens[warmup:]) / sum(self.step_seconds[warmup:])

    def model_flops_per_second(self, warmup: int) -> float:
        return sum(self.model_flops[warmup:]) / sum(self.step_seconds[warmup:])


# -- one side, in its own process ------------------------------------------------------------

def run_side(side: str, workload: str, steps: int, threads: int | None,
             chunk_size: int | None = None) -> SideResult:
    import torch

    from deltatune.eval.memory import peak_rss_bytes
    from deltatune.train.speed import set_threads

    requested_threads = threads  # None: the side's own policy (deltatune adapts to the load)
    threads = set_threads(threads)
    variant = VARIANTS[side]
    if workload == "sst2":
        return run_classification_side(side, variant, steps, requested_threads)
    torch.manual_seed(SEED)
    model, tokenizer, parameters, train_step = _build(variant, chunk_size)
    load_peak_rss = peak_rss_bytes()
    _seeded_lora_init(model)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    batches = _batches(workload, variant, tokenizer, steps)
    setup_rss = _current_rss()
    model.train()
    result = SideResult(side, workload, [], [], [], [], 0, setup_rss, threads)
    flops_of = ModelFlops(model.config, sum(p.numel() for p in parameters))
    threads_policy = _thread_policy(variant, requested_threads)
    for batch, real, computed, lengths, label_positions in batches:
        result.model_flops.append(flops_of.step(lengths, label_positions))
        threads_policy.on_step_end(_STATE)
        started = time.perf_counter()
        loss = train_step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.step_seconds.append(time.perf_counter() - started)
        result.losses.append(loss.item())
        result.real_tokens.append(real)
        result.computed_tokens.append(computed)
    result.peak_rss_bytes = peak_rss_bytes()
    result.extra["thread_changes"] = getattr(threads_policy, "changes", [])
    result.extra["load_peak_rss_bytes"] = load_peak_rss
    return result


def run_classification_side(side: str, variant: Variant, steps: int,
                            requested_threads: int | None) -> SideResult:
    """The sst2 workload: same sentences per step, same seeded head and LoRA A, both sides in
    training mode (dropout on) and AdamW at ENCODER_LR."""
    import torch

    from deltatune.eval.memory import peak_rss_bytes

    torch.manual_seed(SEED)
    if variant.library == "peft":
        model, tokenizer, collate = _build_classification_peer(variant)
    else:
        model, tokenizer, collate = _build_classification_deltatune(variant)
    _seeded_lora_init(model)
    _seeded_head_init(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=ENCODER_LR)
    groups = _sst2_groups(tokenizer, steps)
    batches = [collate(group) for group in groups]
    from deltatune.train.objectives import ClassificationObjective
    objective = ClassificationObjective()
    setup_rss = _current_rss()
    model.train()
    threads_policy = _thread_policy(variant, requested_threads)
    result = SideResult(side, "sst2", [], [], [], [], 0, setup_rss, torch.get_num_threads())
    for group, batch in zip(groups, batches):
        threads_policy.on_step_end(_STATE)
        started = time.perf_counter()
        loss = objective(model, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.step_seconds.append(time.perf_counter() - started)
        result.losses.append(loss.item())
        result.real_tokens.append(sum(len(e["input_ids"]) for e in group))
        result.computed_tokens.append(batch["input_ids"].numel())
        result.model_flops.append(0.0)
    result.peak_rss_bytes = peak_rss_bytes()
    result.extra["thread_changes"] = getattr(threads_policy, "changes", [])
    return result


def _sst2_groups(tokenizer, steps: int) -> list[list[dict]]:
    from deltatune.data import DataConfig, build_datasets, iterate_batches
    size = WORKLOADS["sst2"]["batch"]
    config = DataConfig(train=str(SST2), eval=str(SST2), columns={"text": "sentence"},
                        max_length=WORKLOADS["sst2"]["max_length"], train_limit=steps * size,
                        eval_limit=1)
    examples = build_datasets(config, tokenizer, "classification", SEED).train
    return list(iterate_batches(examples, size, SEED, 0))[:steps]


def _build_classification_peer(variant: Variant):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding)

    from deltatune.models.registry import KNOWN_MODELS
    from deltatune.train.speed import set_allocator_policy

    set_allocator_policy(variant.allocator)
    folder = KNOWN_MODELS[ENCODER].locate()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=ENCODER_RANK, lora_alpha=ENCODER_ALPHA,
                                             lora_dropout=0.0, target_modules=ENCODER_TARGETS,
                                             task_type="SEQ_CLS"))
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(group: list[dict]) -> dict:
        features = [{k: v for k, v in e.items() if k != "label"} | {"labels": e["label"]}
                    for e in group]
        return dict(collator(features))
    return model, tokenizer, collate


def _build_classification_deltatune(variant: Variant):
    import deltatune
    from deltatune.data import pad_batch
    from deltatune.data.packing import collate_packed_sequences
    from deltatune.methods.lora import LoraConfig
    from deltatune.models import load_model
    from deltatune.train.speed import SpeedOptions, apply_speed_options

    loaded = load_model(ENCODER, task="classification", num_labels=2)
    deltatune.apply(loaded.model, LoraConfig(r=ENCODER_RANK, alpha=ENCODER_ALPHA, dropout=0.0,
                                             targets=ENCODER_TARGETS,
                                             modules_to_save=["classifier"]))
    packed = variant.packing is not None
    apply_speed_options(loaded.model, SpeedOptions(
        fused_loss=False, packed_attention=packed, packed_classification=packed,
        fused_mlp=False, allocator=variant.allocator))
    pad = loaded.tokenizer.pad_token_id
    collate = collate_packed_sequences if packed else (lambda group: pad_batch(group, pad))
    return loaded.model, loaded.tokenizer, collate


def _seeded_head_init(model) -> None:
    """The new classification head gets the same seeded values on both sides (PEFT keeps an
    original copy and a trained copy of it: both get them)."""
    import torch
    for name, parameter in model.named_parameters():
        if ".classifier." not in f".{name}" and not name.startswith("classifier."):
            continue
        generator = torch.Generator().manual_seed(SEED + parameter.ndim)
        with torch.no_grad():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02
                            if parameter.ndim > 1 else torch.zeros(parameter.shape))


class _FixedThreads:
    def on_step_end(self, state) -> None: ...


_STATE = None  # AdaptiveThreads only reads the state's step and main-process flag


def _thread_policy(variant: Variant, threads: int | None):
    """deltatune's adaptive threads (between steps, outside the timed part, as in its loop),
    or nothing. With --threads given every side keeps that count."""
    if not variant.adaptive_threads or threads is not None:
        return _FixedThreads()
    from deltatune.train.loop import TrainState
    from deltatune.train.threads import AdaptiveThreads

    global _STATE
    _STATE = TrainState(total_steps=0)
    policy = AdaptiveThreads(every_seconds=5.0)
    policy.on_train_start(_STATE)
    return policy


def _current_rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _build(variant: Variant, chunk_size: int | None = None):
    if variant.library == "peft":
        return _build_peer(variant)
    return _build_deltatune(variant, chunk_size)


def _build_peer(variant: Variant):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.models.registry import cache_dir
    from deltatune.train.speed import set_allocator_policy

    set_allocator_policy(variant.allocator)
    folder = cache_dir(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if variant.base_dtype == "bf16" else torch.float32
    extra = {}
    if variant.quantize == "bnb-nf4":
        from transformers import BitsAndBytesConfig
        extra = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)}
        dtype = torch.float32  # the non-quantized rest, as the PEFT QLoRA examples load it
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                 attn_implementation="sdpa", **extra)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    parameters = [p for p in model.parameters() if p.requires_grad]
    if variant.flatten_collator:
        # Without a cache transformers derives the block-diagonal mask from position_ids; with
        # the model's default use_cache=True it silently lets packed examples see each other.
        return model, tokenizer, parameters, lambda m, b: m(**b, use_cache=False).loss
    return model, tokenizer, parameters, lambda m, b: m(**b).loss


def _build_deltatune(variant: Variant, chunk_size: int | None):
    import deltatune
    from deltatune.methods.lora import LoraConfig
    from deltatune.models import load_model
    from deltatune.models.fused_loss import install_fused_loss
    from deltatune.train.objectives import CausalLMObjective
    from deltatune.train.speed import SpeedOptions, apply_speed_options

    loaded = load_model(MODEL, quantize=variant.quantize)
    handle = deltatune.apply(loaded.model, LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0,
                                                      targets=TARGETS))
    if variant.base_dtype == "bf16":
        import torch

        from deltatune.quant import use_base_dtype
        use_base_dtype(loaded.model, torch.bfloat16)
    if variant.chunked_loss and chunk_size is not None:
        install_fused_loss(loaded.model, chunk_size)
    apply_speed_options(loaded.model, SpeedOptions(
        fused_loss=variant.chunked_loss, packed_attention=variant.packed_attention,
        activation_checkpointing=variant.checkpointing, compile=variant.compile,
        fused_mlp=variant.fused_mlp, allocator=variant.allocator))
    objective = CausalLMObjective()
    return (loaded.model, loaded.tokenizer, handle.trainable_parameters(),
            lambda m, b: objective(m, b).loss)


class ModelFlops:
    """The useful FLOPs of one LoRA training step, the same for every side (padding, and the head
    on unlabelled positions, are not useful work): per real token the frozen body forward (2P)
    and its activation gradient (2P), the LoRA factors (forward, activation and weight gradient:
    6 x trainable); the head (4 x vocab x hidden) per labelled position; causal attention
    (forward 4 x heads x head_dim per query-key pair, backward twice that) per example."""

    def __init__(self, config, trainable: int):
        self.hidden, self.vocab = config.hidden_size, config.vocab_size
        self.layers = config.num_hidden_layers
        self.attention_width = config.num_attention_heads * getattr(
            config, "head_dim", config.hidden_size // config.num_attention_heads)
        kv_width = config.num_key_value_heads * self.attention_width // config.num_attention_heads
        per_layer = (2 * self.hidden * self.attention_width + 2 * self.hidden * kv_width
                     + 3 * self.hidden * config.intermediate_size)
        self.body = per_layer * self.layers
        self.trainable = trainable

    def step(self, lengths: list[int], label_positions: int) -> float:
        tokens = sum(lengths)
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return (4 * self.body * tokens + 6 * self.trainable * tokens
                + 4 * self.vocab * self.hidden * label_positions
                + 3 * 4 * self.attention_width * pairs * self.layers)


def measure_matmul_peak(threads: int | None, repeats: int = 7) -> float:
    """Best fp32 FLOP/s over PEAK_SHAPES, best of `repeats` timings each."""
    import torch

    from deltatune.train.speed import set_threads
    set_threads(threads)
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def _seeded_lora_init(model) -> None:
    """Both libraries draw LoRA A in different orders; give every lora_A the same values on both
    sides (B is zero) so the loss curves are comparable step by step."""
    import torch
    for name, parameter in model.named_parameters():
        if "lora_A" not in name:
            continue
        canonical = name.replace("base_model.model.", "").replace(".default", "")
        generator = torch.Generator().manual_seed(SEED + zlib.crc32(canonical.encode()))
        bound = (1.0 / parameter.shape[1]) ** 0.5  # kaiming_uniform(a=sqrt(5)), as both use
        with torch.no_grad():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)


# -- batches ---------------------------------------------------------------------------------

def _batches(workload: str, variant: Variant, tokenizer, steps: int) -> list[tuple]:
    """(batch, real tokens, computed tokens, example lengths, labelled positions) per step;
    identical examples on every side."""
    if workload == "fixed":
        return [_fixed_batch(step, variant) for step in range(steps)]
    return [_alpaca_batch(group, variant, tokenizer) for group in _alpaca_groups(tokenizer, steps)]


def _fixed_batch(step: int, variant: Variant) -> tuple:
    import torch
    shape = (WORKLOADS["fixed"]["batch"], WORKLOADS["fixed"]["length"])
    generator = torch.Generator().manual_seed(SEED * 7919 + step)
    input_ids = torch.randint(0, 49152, shape, generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if variant.library == "peft":
        batch["attention_mask"] = torch.ones_like(input_ids)  # what a tokenizer/collator gives
    rows, length = shape
    return batch, input_ids.numel(), input_ids.numel(), [length] * rows, rows * (length - 1)


def _alpaca_groups(tokenizer, steps: int) -> list[list[dict]]:
    from deltatune.data import encode_instructions, iterate_batches
    records = json.loads(ALPACA.read_text())
    examples, _ = encode_instructions(records, tokenizer, "alpaca",
                                      WORKLOADS["alpaca"]["max_length"])
    groups: list[list[dict]] = []
    epoch = 0
    while len(groups) < steps:
        groups.extend(iterate_batches(examples, WORKLOADS["alpaca"]["batch"], SEED, epoch,
                                      drop_last=True))
        epoch += 1
    return groups[:steps]


def _alpaca_batch(group: list[dict], variant: Variant, tokenizer) -> tuple:
    real = sum(len(example["input_ids"]) for example in group)
    features = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in group]
    if variant.library == "peft":
        batch = _peer_collate(features, variant, tokenizer)
    elif variant.packing is None:
        from deltatune.data import pad_batch
        batch = pad_batch(features, tokenizer.pad_token_id)
    else:
        from deltatune.data.packing import collate_packed, pack_examples
        row_length = WORKLOADS["alpaca"]["max_length"] if variant.packing == "rows" else None
        batch = collate_packed(pack_examples(features, row_length), tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in group]
    # Positions whose next token is labelled: the labels of each example, shifted by one.
    label_positions = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in group)
    return batch, real, batch["input_ids"].numel(), lengths, label_positions


def _peer_collate(features: list[dict], variant: Variant, tokenizer) -> dict:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
    if variant.flatten_collator:
        return dict(DataCollatorWithFlattening()(features))
    return dict(DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(features))


# -- orchestration ---------------------------------------------------------------------------

def run_in_subprocess(side: str, workload: str, steps: int, threads: int | None,
                      chunk_size: int | None = None) -> SideResult:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--worker", side, "--workload", workload,
                   "--steps", str(steps), "--result", str(output)]
        if threads is not None:
            command += ["--threads", str(threads)]
        if chunk_size is not None:
            command += ["--chunk-size", str(chunk_size)]
        subprocess.run(command, check=True, cwd=ROOT)
        return SideResult(**json.loads(output.read_text()))


def summarise(results: list[SideResult], warmup: int, peak_flops: float,
              reference: str = "peer") -> dict:
    """Per workload and side: median tokens/s over repeats, max peak RSS, ratios to the
    `reference` side (the peer) and to deltatune's default side."""
    summary: dict = {}
    for workload in dict.fromkeys(r.workload for r in results):
        rows = {}
        for side in dict.fromkeys(r.side for r in results if r.workload == workload):
            runs = [r for r in results if r.workload == workload and r.side == side]
            speeds = [r.tokens_per_second(warmup) for r in runs]
            rows[side] = {
                "real_tokens_per_s": statistics.median(speeds),
                "real_tokens_per_s_runs": [round(speed, 1) for speed in speeds],
                "best_of_repeats_tokens_per_s": _best_of_repeats(runs, warmup),
                "first_step_s": max(r.step_seconds[0] for r in runs),
                "peak_rss_gb": max(r.peak_rss_bytes for r in runs) / 1e9,
                "padding_fraction": 1 - sum(runs[0].real_tokens) / sum(runs[0].computed_tokens),
                "mfu": statistics.median(r.model_flops_per_second(warmup) for r in runs)
                / peak_flops,
                "model_gflops_per_step": sum(runs[0].model_flops) / len(runs[0].model_flops) / 1e9,
                "final_loss": runs[0].losses[-1],
                "losses": [round(x, 4) for x in runs[0].losses],
                "threads": runs[0].threads,
                "load_peak_rss_gb": max(r.extra.get("load_peak_rss_bytes", 0) for r in runs) / 1e9,
            }
        peer = rows.get(reference)
        ours = rows.get("deltatune")
        for row in rows.values():
            if ours is not None:
                row["speed_vs_deltatune"] = row["real_tokens_per_s"] / ours["real_tokens_per_s"]
                row["memory_vs_deltatune"] = row["peak_rss_gb"] / ours["peak_rss_gb"]
                row["max_loss_diff_vs_deltatune"] = max(
                    abs(a - b) for a, b in zip(row["losses"], ours["losses"]))
        for side, row in rows.items():
            if peer is not None:
                row["speed_vs_peer"] = row["real_tokens_per_s"] / peer["real_tokens_per_s"]
                row["best_speed_vs_peer"] = (row["best_of_repeats_tokens_per_s"]
                                             / peer["best_of_repeats_tokens_per_s"])
                row["memory_vs_peer"] = row["peak_rss_gb"] / peer["peak_rss_gb"]
                row["max_loss_diff_vs_peer"] = max(
                    abs(a - b) for a, b in zip(row["losses"], peer["losses"]))
        summary[workload] = rows
    return summary


def _best_of_repeats(runs: list[SideResult], warmup: int) -> float:
    """Tokens/s with every step timed at its fastest repeat: each repeat runs the same batches,
    and on a shared machine other processes only ever add time."""
    fastest = [min(r.step_seconds[i] for r in runs) for i in range(warmup, len(runs[0].losses))]
    return sum(runs[0].real_tokens[warmup:]) / sum(fastest)


def print_against_deltatune(summary: dict) -> None:
    """Each side against deltatune's default fp32 LoRA side (the QLoRA and bf16 targets)."""
    print(f"{'workload':8} {'side':17} {'x deltatune tok/s':>17} {'x deltatune peak':>16} "
          f"{'load peak GB':>12} {'max |dloss| vs dt':>17}")
    for workload, rows in summary.items():
        for side, row in rows.items():
            if "speed_vs_deltatune" in row:
                print(f"{workload:8} {side:17} {row['speed_vs_deltatune']:17.2f} "
                      f"{row['memory_vs_deltatune']:16.2f} {row['load_peak_rss_gb']:12.2f} "
                      f"{row['max_loss_diff_vs_deltatune']:17.4f}")


def print_table(summary: dict) -> None:
    header = (f"{'workload':8} {'side':17} {'real tok/s':>10} {'x peer':>7} {'best tok/s':>10} "
              f"{'x peer':>7} {'peak RSS GB':>11} {'x peer':>7} {'pad %':>6} {'MFU%':>5} "
              f"{'1st step s':>10} {'final loss':>10} {'max |dloss|':>11}")
    print(header)
    for workload, rows in summary.items():
        for side, row in rows.items():
            print(f"{workload:8} {side:17} {row['real_tokens_per_s']:10.1f} "
                  f"{row.get('speed_vs_peer', float('nan')):7.2f} "
                  f"{row['best_of_repeats_tokens_per_s']:10.1f} "
                  f"{row.get('best_speed_vs_peer', float('nan')):7.2f} {row['peak_rss_gb']:11.2f} "
                  f"{row.get('memory_vs_peer', float('nan')):7.2f} "
                  f"{100 * row['padding_fraction']:6.1f} {100 * row['mfu']:5.1f} "
                  f"{row['first_step_s']:10.1f} {row['final_loss']:10.4f} {row.get('max_loss_diff_vs_peer', 0.0):11.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all",
                        help="all = every workload, sst2 included")
    parser.add_argument("--sides", default="peer,deltatune",
                        help=f"comma-separated, from {', '.join(VARIANTS)}; peer-flat is "
                             "alpaca only")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tok/s")
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 warmup, 1 round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="label positions per loss chunk on deltatune sides")
    parser.add_argument("--competing-processes", type=int, default=0,
                        help="run N busy CPU processes during every side (a shared machine)")
    parser.add_argument("--reference", default="peer",
                        help="the side the 'x peer' ratios divide by (e.g. peer-qlora)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_side(args.worker, args.workload, args.steps, args.threads, args.chunk_size)
        args.result.write_text(json.dumps(asdict(result)))
        return
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    _ensure_model_cache()
    from deltatune.quant.precision import native_bf16_flags
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores, native bf16 flags: "
          f"{native_bf16_flags() or 'none'}; competing processes: {args.competing_processes}",
          flush=True)
    peak_at_start = measure_matmul_peak(args.threads)
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    sides = args.sides.split(",")
    results = []
    competitors = start_competitors(args.competing_processes)
    try:
        _run_all(args, workloads, sides, results)
    finally:
        stop_competitors(competitors)
    peaks = [peak_at_start, measure_matmul_peak(args.threads)]
    args.peak_flops = max(peaks)
    print(f"fp32 matmul peak (best of {PEAK_SHAPES}): "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s at start, end")
    summary = summarise(results, args.warmup, args.peak_flops, args.reference)
    summary["conditions"] = _conditions(args)
    print_table({k: v for k, v in summary.items() if k != "conditions"})
    print_against_deltatune({k: v for k, v in summary.items() if k != "conditions"})
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


# A competing CPU-bound job, bounded in time so it can never outlive the benchmark for long.
_BUSY_LOOP = ("import time\nend = time.monotonic() + {seconds}\nx = 0\n"
              "while time.monotonic() < end:\n    x = (x * 1103515245 + 12345) % 2147483648\n")


def start_competitors(count: int, seconds: int = 7200) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP.format(seconds=seconds)])
            for _ in range(count)]


def stop_competitors(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


def _run_all(args, workloads: list[str], sides: list[str], results: list) -> None:
    for workload in workloads:
        for repeat in range(args.repeats):
            for side in sides:
                if side == "peer-flat" and workload != "alpaca":
                    continue  # only the alpaca workload has the peer's flattening collator
                if workload == "sst2" and side not in CLASSIFICATION_SIDES:
                    continue
                result = run_in_subprocess(side, workload, args.steps, args.threads,
                                           args.chunk_size)
                results.append(result)
                print(f"[{workload} round {repeat + 1}] {side}: "
                      f"{result.tokens_per_second(args.warmup):.1f} real tok/s, peak RSS "
                      f"{result.peak_rss_bytes / 1e9:.2f} GB, loss {result.losses[-1]:.4f}",
                      flush=True)


def _ensure_model_cache() -> None:
    from deltatune.models.registry import is_cached
    if not is_cached(MODEL):
        subprocess.run([sys.executable, "-c", f"from deltatune.models import load_model; "
                        f"load_model({MODEL!r})"], check=True, cwd=ROOT)


def cpu_name() -> str:
    from deltatune.quant.precision import cpu_name as read_cpu_name
    return read_cpu_name()


def _conditions(args) -> dict:
    return {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "competing_processes": args.competing_processes, "cpu": cpu_name(),
            "threads": args.threads, "chunk_size": args.chunk_size, "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "peak_flops": args.peak_flops}


if __name__ == "__main__":
    main()
