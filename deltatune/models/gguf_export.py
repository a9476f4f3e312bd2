"""Writing a merged Llama-architecture causal LM as a GGUF file (llama.cpp's format) with the
`gguf` package, the way llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM`: its
tensor names (`token_embd`, `blk.N.attn_q`, ..., `output` only when the head is not tied), the
rotary row permutation of q/k, every hyperparameter key, and the byte-level BPE tokenizer
(`tokenizer.ggml.model` "gpt2" with tokens, types, merges, special ids and chat template). Norms
and other 1-D tensors stay F32; q8_0/q4_0 quantize the 2-D weights whose rows split into 32-value
blocks and keep the rest F16. `compare_gguf` reads the file back with transformers (and with
llama-cpp-python where installed) and measures how far its logits and cross-entropy moved.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.fileio import atomic_path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
FILE_TYPES = ("f16", "q8_0", "q4_0")
GGUF_ARCH = "llama"

# The special-token attributes of a transformers tokenizer -> the GGUF writer method for its id.
_SPECIAL_IDS = {"bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
                "unk_token_id": "add_unk_token_id", "pad_token_id": "add_pad_token_id"}

# Llama 3's split pattern (tokenizer.json `Split` regex), which llama.cpp calls "llama-bpe".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFExportError(DeltatuneError):
    """The model or tokenizer cannot be written as GGUF (architecture, tokenizer kind, rope
    scaling); the message names what is supported."""


def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike,
               file_type: str = "f16", name: str | None = None) -> dict[str, Any]:
    """Writes `model` (a dense, unwrapped LlamaForCausalLM) and its tokenizer to `path` as a
    GGUF file of `file_type` ("f16", "q8_0" or "q4_0"). The file is written under a temporary
    name and renamed: it is either whole or absent. Returns the path, bytes and the number of
    tensors of each GGML type."""
    import gguf

    if file_type not in FILE_TYPES:
        raise GGUFExportError(f"unknown GGUF file type {file_type!r}; use one of "
                              f"{', '.join(FILE_TYPES)}")
    check_architecture(model)
    config = model.config
    state = _plain_state(model)
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    vocabulary = tokenizer_vocabulary(tokenizer, vocab_size)
    tensors = list(_gguf_tensors(state, config, file_type, gguf))
    target = Path(path)
    with atomic_path(target) as temporary:
        writer = gguf.GGUFWriter(str(temporary), GGUF_ARCH)
        _add_general(writer, name or target.stem, file_type, gguf)
        _add_hyperparameters(writer, config, vocab_size, gguf)
        _add_tokenizer(writer, vocabulary)
        for tensor_name, data, raw_type in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    counts: dict[str, int] = {}
    for _, _, raw_type in tensors:
        counts[raw_type.name] = counts.get(raw_type.name, 0) + 1
    return {"path": str(target), "file_type": file_type, "bytes": target.stat().st_size,
            "tensor_types": counts}


def check_architecture(model: nn.Module) -> None:
    """Refuses every architecture but Llama's (SmolLM2 is one), naming the supported ones."""
    architecture = type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)} (Llama-architecture "
            f"causal LMs such as SmolLM2), not {architecture}; export the merged folder "
            "without --gguf and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope_parameters(model.config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise GGUFExportError(
            f"GGUF export supports default and linear rope scaling, not "
            f"{rope.get('rope_type')!r}; convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py instead")


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in `rope_theta`
    and `rope_scaling`."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    for key, value in scaling.items():
        rope.setdefault(key, value)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each tensor once (a tied head is the embedding, written once as llama.cpp does), dense."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        dequantize = getattr(tensor, "dequantize", None)
        state[key] = dequantize() if callable(dequantize) else tensor
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    wrapped = [key for key in state if ".base_layer." in key]
    if wrapped:
        raise GGUFExportError(f"the model still holds adapter wrappers ({wrapped[0]}, ...); "
                              "merge the adapter and unwrap the model before writing GGUF")
    return state


# -- hyperparameters ---------------------------------------------------------------------------

def _add_general(writer: Any, name: str, file_type: str, gguf: Any) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    # transformers' GGUF reader treats a name containing "mistral" as the mistral architecture.
    writer.add_name(name.replace("mistral", "mistral-model"))
    writer.add_file_type(_file_type_id(file_type, gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type_id(file_type: str, gguf: Any) -> int:
    ids = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
           "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    return int(ids[file_type])


def _add_hyperparameters(writer: Any, config: Any, vocab_size: int, gguf: Any) -> None:
    """The keys convert_hf_to_gguf writes for LlamaForCausalLM (`llama.*`)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# -- tensors -----------------------------------------------------------------------------------

def _gguf_tensors(state: dict[str, torch.Tensor], config: Any, file_type: str, gguf: Any):
    """(GGUF name, numpy data, GGML type) for every tensor, in the model's order."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = "lm_head.weight" not in state
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every loader from the rope keys
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for tensor {key!r}: this Llama variant has "
                                  "parts llama.cpp's llama architecture does not know")
        data = tensor.detach().to(torch.float32).cpu()
        if ".attn_q." in gguf_name:
            data = permute_for_rope(data, heads)
        elif ".attn_k." in gguf_name:
            data = permute_for_rope(data, kv_heads)
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        raw_type = tensor_type(data.shape, file_type, is_output, gguf)
        yield gguf_name, _encode(data.numpy(), raw_type, gguf), raw_type


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout: transformers rotates the two halves of each head, GGML
    rotates adjacent pairs, so convert_hf_to_gguf interleaves the rows of q/k within each of
    the `heads` heads (q: attention heads, k: key/value heads; transformers' GGUF loader
    undoes it)."""
    shape = weight.shape
    return (weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def tensor_type(shape: tuple[int, ...] | torch.Size, file_type: str, is_output: bool,
                gguf: Any) -> Any:
    """F32 for 1-D tensors (norms, biases); for 2-D weights the file's type where each row
    splits into whole blocks, else F16 (llama.cpp's fallback). q4_0 files keep the output
    matrix (the tied embedding in SmolLM2) at Q8_0, as llama-quantize keeps it above 4 bits."""
    types = gguf.GGMLQuantizationType
    if len(shape) <= 1:
        return types.F32
    wanted = {"f16": types.F16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[file_type]
    if wanted == types.Q4_0 and is_output:
        wanted = types.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else types.F16


def _encode(data: np.ndarray, raw_type: Any, gguf: Any) -> np.ndarray:
    types = gguf.GGMLQuantizationType
    if raw_type == types.F32:
        return data.astype(np.float32)
    if raw_type == types.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, raw_type)


# -- tokenizer ---------------------------------------------------------------------------------

def tokenizer_vocabulary(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: `vocab_size` tokens
    (ids the tokenizer lacks become `[PAD<id>]`, unused, as convert_hf_to_gguf pads), their
    types, the merges, the pre-tokenizer name, the special ids and the chat template."""
    import gguf

    backend = _backend_json(tokenizer)
    if backend["model"].get("type") != "BPE" or not _is_byte_level(backend):
        raise GGUFExportError(
            "GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2', as "
            f"SmolLM2, GPT-2 and Llama 3 use); this tokenizer is a {backend['model'].get('type')} "
            "model without byte-level pre-tokenization; convert it with llama.cpp instead")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model's "
                              f"embedding only {vocab_size} rows; resize the embeddings first")
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif index in added:
            tokens.append(token)
            special = added[index].special or _looks_special(token)
            types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    return {"tokens": tokens, "token_types": types, "merges": _merges(backend),
            "pre": _pre_tokenizer_name(backend.get("pre_tokenizer")),
            "special_ids": {key: getattr(tokenizer, key, None) for key in _SPECIAL_IDS},
            **_adds_specials(tokenizer),
            "chat_template": _chat_template(tokenizer)}


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"GGUF export needs a fast (tokenizers) tokenizer; "
                              f"{type(tokenizer).__name__} is a slow one: save it with "
                              "tokenizers (tokenizer.json) first")
    return json.loads(backend.to_str())


def _is_byte_level(backend: dict[str, Any]) -> bool:
    """Byte-level BPE decodes with the ByteLevel decoder (GPT-2's byte-to-unicode alphabet)."""
    decoder = backend.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" \
        else [decoder]
    return any(part.get("type") == "ByteLevel" for part in decoders)


def _merges(backend: dict[str, Any]) -> list[str]:
    """Merges as "left right" strings; newer tokenizer.json files store [left, right] pairs."""
    return [merge if isinstance(merge, str) else " ".join(merge)
            for merge in backend["model"].get("merges", [])]


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the text split before BPE (`tokenizer.ggml.pre`), recognised from the
    tokenizer.json structure (llama.cpp recognises it from a hash of sample encodings)."""
    parts = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" \
        else [pre or {}]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") \
            == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise GGUFExportError(
        f"unrecognised pre-tokenizer {kinds} in tokenizer.json; GGUF export knows GPT-2's "
        "ByteLevel ('gpt2'), SmolLM's Digits+ByteLevel ('smollm') and Llama 3's split "
        "('llama-bpe'); convert this model with llama.cpp's convert_hf_to_gguf.py")


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's rule: <|...|>, <...> and [...] added tokens are control tokens."""
    return (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<") and token.endswith(">")) or \
        (token.startswith("[") and token.endswith("]"))


def _adds_specials(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, read from what the tokenizer actually does."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"add_bos": bos is not None and bool(ids) and ids[0] == bos,
            "add_eos": eos is not None and bool(ids) and ids[-1] == eos}


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def _add_tokenizer(writer: Any, vocabulary: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["token_types"])
    writer.add_token_merges(vocabulary["merges"])
    for key, method in _SPECIAL_IDS.items():
        if vocabulary["special_ids"].get(key) is not None:
            getattr(writer, method)(int(vocabulary["special_ids"][key]))
    writer.add_add_bos_token(vocabulary["add_bos"])
    writer.add_add_eos_token(vocabulary["add_eos"])
    if vocabulary["chat_template"]:
        writer.add_chat_template(vocabulary["chat_template"])


# -- reading back ------------------------------------------------------------------------------

def compare_gguf(reference: nn.Module, folder: str | os.PathLike, gguf_file: str,
                 sequences: list[list[int]]) -> dict[str, Any]:
    """Loads `folder/gguf_file` with transformers (dequantized to fp32) and compares it with
    `reference` (the merged fp32 model) on `sequences` of token ids: the largest logit
    difference and the next-token cross-entropy of both. Adds the same comparison through
    llama-cpp-python when it is installed."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file,
                                                  dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
    expected = sequence_logits(reference, sequences)
    result = _logit_comparison(expected, sequence_logits(loaded, sequences), sequences)
    del loaded
    llama_cpp = _llama_cpp_logits(Path(folder) / gguf_file, sequences)
    if llama_cpp is not None:
        result["llama_cpp"] = _logit_comparison(expected, llama_cpp, sequences)
    return result


def sequence_logits(model: nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits of each sequence run alone (no padding that could change the numbers)."""
    outputs = []
    with torch.inference_mode():
        for ids in sequences:
            input_ids = torch.tensor([ids])
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
            outputs.append(logits[0].float())
    return outputs


def next_token_cross_entropy(logits: list[torch.Tensor], sequences: list[list[int]]) -> float:
    """Mean cross-entropy of predicting token t+1 from the logits at t, over every sequence."""
    total, count = 0.0, 0
    for row, ids in zip(logits, sequences):
        if len(ids) < 2:
            continue
        targets = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(row[:-1], targets, reduction="sum"))
        count += len(ids) - 1
    return total / max(count, 1)


def _logit_comparison(expected: list[torch.Tensor], actual: list[torch.Tensor],
                      sequences: list[list[int]]) -> dict[str, Any]:
    max_diff = max(float((a - e).abs().max()) for e, a in zip(expected, actual))
    reference_ce = next_token_cross_entropy(expected, sequences)
    gguf_ce = next_token_cross_entropy(actual, sequences)
    agreement = [float((a.argmax(-1) == e.argmax(-1)).float().mean())
                 for e, a in zip(expected, actual)]
    return {"max_logit_diff": max_diff, "cross_entropy_reference": reference_ce,
            "cross_entropy_gguf": gguf_ce, "cross_entropy_change": gguf_ce - reference_ce,
            "top1_agreement": sum(agreement) / len(agreement),
            "tokens": sum(len(ids) for ids in sequences)}


def _llama_cpp_logits(path: Path, sequences: list[list[int]]) -> list[torch.Tensor] | None:
    """The same logits computed by llama.cpp itself, or None when llama-cpp-python is absent."""
    try:
        import llama_cpp
    except ImportError:
        return None
    context = max(len(ids) for ids in sequences)
    model = llama_cpp.Llama(model_path=str(path), n_ctx=max(context, 8), logits_all=True,
                            verbose=False, n_threads=max(1, (os.cpu_count() or 1)))
    outputs = []
    for ids in sequences:
        model.reset()
        model.eval(ids)
        outputs.append(torch.tensor(np.array(model.scores[:len(ids)]), dtype=torch.float32))
    if hasattr(model, "close"):
        model.close()
    return outputs


