"""The `deltatune export` subcommand: its flags and --help, turned into an `ExportRequest`
(deltatune/jobs/export.py), whose report it prints as JSON on stdout; stage lines go to stderr.
`deltatune/cli.py` registers it with `add_export_parser(sub)`; user mistakes raise
DeltatuneError subclasses, which `cli.main` prints as one `error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import json

from deltatune.errors import ConfigError

GGUF_TYPES = ("f16", "q8_0", "q4_0")

_DESCRIPTION = """\
Merge a trained adapter into its base model and write a plain model folder that
transformers loads with AutoModelForCausalLM (or AutoModelForSequenceClassification for a
classification run), plus optionally a GGUF file for llama.cpp.

What happens, in order (each stage is printed to stderr):
  1. loading   the run's base model and adapter (or --model with --adapter)
  2. merging   the adapter is folded into the weights (W + dW; quantized base weights are
               dequantized first) and the adapter wrappers are removed
  3. writing   config.json, model.safetensors, tokenizer and generation config
  4. checking  the folder is loaded back with transformers; its logits on a fixed check
               input must equal the unmerged adapter's (max difference <= 1e-4 of the
               logit scale); with --gguf the file is read back too and its logit and
               cross-entropy change reported (f16 ~ exact, q8_0 small, q4_0 larger)

The report (sizes, parameters, differences) is printed as JSON and saved as
export_report.json in the folder. Everything is built in a hidden temporary folder next to
--out and renamed into place at the end: an interrupted or failed export leaves --out as it
was. Methods that change the computation rather than the weights (prefix, prompt,
ptuning, bottleneck adapters) cannot be merged; the error lists those that can."""

_EPILOG = """\
examples:
  deltatune export runs/my-lora --merge --out exports/my-model
  deltatune export runs/my-lora --merge --out exports/my-model --gguf q8_0
  deltatune export --model smollm2-135m --adapter my-adapter/ --merge --out exports/m
  deltatune export runs/my-lora --merge --out exports/m --gguf q4_0 \\
      --check-file ../shared/data/text/wikitext2_test.txt --check-tokens 2000"""


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `export` on the top-level parser's subcommands."""
    p = sub.add_parser(
        "export", help="merge an adapter into its base model; write a transformers folder "
        "(and optionally GGUF)", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="run directory written by `deltatune train` (its base model and "
                   "adapter); or give --model and --adapter instead")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights (required: the only kind of "
                   "export so far)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to create; must not exist or be empty unless --overwrite")
    p.add_argument("--gguf", choices=GGUF_TYPES,
                   help="also write DIR/model-TYPE.gguf for llama.cpp (Llama-architecture "
                   "causal LMs such as SmolLM2): f16 = half precision, q8_0 = 8-bit blocks, "
                   "q4_0 = 4-bit blocks (the output matrix stays 8-bit); norms stay f32")
    p.add_argument("--model", help="base model name, folder or hub id (instead of RUN, with "
                   "--adapter; with RUN it replaces the run's base model)")
    p.add_argument("--adapter", metavar="DIR",
                   help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--task", choices=["causal-lm", "classification"],
                   help="with --model/--adapter: the adapter's task (default causal-lm; a run "
                   "knows its own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is removed only after the "
                   "new export passed its checks)")
    p.add_argument("--check-file", metavar="TEXT_FILE",
                   help="check on the first --check-tokens tokens of this text file instead of "
                   "the built-in sentences (e.g. to measure the GGUF cross-entropy change)")
    p.add_argument("--check-tokens", type=int, default=512, metavar="N",
                   help="tokens of --check-file to use (default 512)")
    p.add_argument("--no-progress", action="store_true", help="no stage lines on stderr")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that the model, tokenizer or adapter folder ships "
                   "(auto_map in its config); off by default: only for code you have read")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from deltatune.jobs.export import ExportRequest, export_merged

    if not args.merge:
        raise ConfigError("export needs --merge (fold the adapter into the weights); to keep "
                          "the adapter separate, use the run's adapter/ folder as it is")
    if args.run is None and not (args.model and args.adapter):
        raise ConfigError("say what to export: a RUN directory, or --model NAME_OR_PATH with "
                          "--adapter DIR")
    request = ExportRequest(out=args.out, run=args.run, model=args.model, adapter=args.adapter,
                            task=args.task, gguf=args.gguf, overwrite=args.overwrite,
                            trust_remote_code=args.trust_remote_code,
                            check_file=args.check_file, check_tokens=args.check_tokens,
                            progress=not args.no_progress)
    report = export_merged(request)
    print(json.dumps(report, indent=2, sort_keys=True, default=str))
    return 0


__all__ = ["add_export_parser", "cmd_export"]
