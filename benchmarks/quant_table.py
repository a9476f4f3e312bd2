"""Number formats on smollm2-135m: bytes on disk, WikiText-2 perplexity and milliseconds per
generated token for fp32, bf16 and every deltatune.quant format, in one run on one machine.

Each row loads the fp32 model, converts its linear layers (the embeddings/tied head stay in the
base dtype, as in QLoRA), writes the packed folder with `save_quantized` (so the bytes are the
real file's) and measures: perplexity over the first `--tokens` tokens of WikiText-2 test in
windows of 512 (the same tokens for every row), and greedy decoding of `--generate` tokens at
batch 1 (inference kernels as `quant.kernels` picks them; its choices are printed). Example:

    python benchmarks/quant_table.py --tokens 16384 --json benchmarks/quant_table.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
TEXT = ROOT.parent / "shared" / "data" / "text" / "wikitext2_test.txt"
ROWS = ["fp32", "bf16", "int8", "nf4", "int4-g128", "int4-g128-asym", "int2-g64", "int1-g64",
        "ternary"]


def measure_row(row: str, tokens: int, generate: int) -> dict:
    import torch

    from deltatune.jobs.quantize import QuantizeRequest, _ms_per_token, _text_perplexity
    from deltatune.models import load_model
    from deltatune.quant import quantize_model, use_base_dtype
    from deltatune.models import save_quantized

    loaded = load_model(MODEL)
    request = QuantizeRequest(source=MODEL, quant_format="nf4", out="", eval_text=str(TEXT),
                              eval_tokens=tokens, generate_tokens=generate, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        if row == "fp32":
            disk = _dense_bytes(loaded.model, 4)
        elif row == "bf16":
            use_base_dtype(loaded.model, torch.bfloat16)
            disk = _dense_bytes(loaded.model, 2)
        else:
            quantize_model(loaded.model, row)
            save_quantized(loaded.model, loaded.tokenizer, Path(folder) / "packed")
            disk = (Path(folder) / "packed" / "model.safetensors").stat().st_size
        started = time.perf_counter()
        quality = _text_perplexity(loaded, request)
        eval_seconds = time.perf_counter() - started
        ms = _ms_per_token(loaded, None, request)
    return {"format": row, "bytes_on_disk": disk, "perplexity": quality["perplexity"],
            "loss": quality["loss"], "eval_tokens": quality["eval_tokens"],
            "eval_seconds": round(eval_seconds, 1), "ms_per_token": ms}


def _dense_bytes(model, bytes_per_value: int) -> int:
    """The safetensors size of the model saved densely at this precision (tied weights once)."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * bytes_per_value for p in unique.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384,
                        help="WikiText-2 test tokens scored per row")
    parser.add_argument("--generate", type=int, default=32, help="tokens per ms/token timing")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from deltatune.quant.kernels import kernel_choices
    from deltatune.quant.precision import cpu_name, native_bf16_flags

    print(f"cpu: {cpu_name()}, native bf16 flags: {native_bf16_flags() or 'none'}, "
          f"threads {torch.get_num_threads()}", flush=True)
    results = []
    for row in args.rows.split(","):
        result = measure_row(row, args.tokens, args.generate)
        results.append(result)
        print(json.dumps(result), flush=True)
    fp32 = results[0] if results[0]["format"] == "fp32" else None
    print(f"\n{'format':16} {'MB on disk':>10} {'x fp32':>7} {'perplexity':>10} "
          f"{'ms/token':>9}")
    for result in results:
        ratio = result["bytes_on_disk"] / fp32["bytes_on_disk"] if fp32 else float("nan")
        print(f"{result['format']:16} {result['bytes_on_disk'] / 1e6:10.1f} {ratio:7.3f} "
              f"{result['perplexity']:10.2f} {result['ms_per_token']:9.1f}")
    choices = kernel_choices()
    print("\nkernel choices:", json.dumps(choices, default=str)[:3000])
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": results,
                                         "kernels": choices, "tokens": args.tokens,
                                         "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
