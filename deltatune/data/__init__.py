"""Data for fine-tuning: read records from files, the Hugging Face hub or built-in tasks, encode
them for causal-LM instruction tuning (loss on responses only), sequence classification or plain
language-model adaptation, and batch them. `build_datasets(DataConfig, tokenizer, encoding)` is the
entry point; the rest is public for tests, tools and custom pipelines.
"""
from deltatune.data.builtin import BUILTIN_TASKS, BuiltinTask, builtin_task
from deltatune.data.classification import (encode_classification, encode_classification_records,
                                           label_to_index, resolve_label_names)
from deltatune.data.collate import iterate_batches, num_batches, pad_batch
from deltatune.data.dataset import (ENCODINGS, ClassificationEncoding, DataConfig, DataEncoding,
                                    Datasets, InstructionEncoding, TextBlockEncoding,
                                    build_datasets, discover_label_names, encoding_for,
                                    sample_records, split_records)
from deltatune.data.readers import HubSource, parse_hub_source, read_records, require_fields
from deltatune.data.templates import (IGNORE_INDEX, TEMPLATES, alpaca_prompt,
                                      count_unfilled_placeholders, encode_instruction,
                                      encode_instructions, fill_placeholders, has_loss,
                                      record_to_messages, render_prompt)
from deltatune.data.text import build_text_blocks

__all__ = [
    "BUILTIN_TASKS", "BuiltinTask", "builtin_task",
    "encode_classification", "encode_classification_records", "label_to_index",
    "resolve_label_names",
    "iterate_batches", "num_batches", "pad_batch",
    "DataConfig", "Datasets", "DataEncoding", "InstructionEncoding", "ClassificationEncoding",
    "TextBlockEncoding", "ENCODINGS", "encoding_for", "build_datasets", "discover_label_names", "sample_records",
    "split_records",
    "HubSource", "parse_hub_source", "read_records", "require_fields",
    "IGNORE_INDEX", "TEMPLATES", "alpaca_prompt", "count_unfilled_placeholders",
    "encode_instruction", "encode_instructions", "fill_placeholders", "has_loss",
    "record_to_messages", "render_prompt",
    "build_text_blocks",
]
