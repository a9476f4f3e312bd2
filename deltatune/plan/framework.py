"""The method-choice framework of seed 003, as one function both `deltatune plan` (estimates)
and `deltatune compare` (measurements) use for their recommendation.

The framework, by the size of the model being adapted:
- below ~1B parameters with ample memory: full fine-tuning (best quality, affordable);
- ~1B to ~13B: LoRA or bottleneck adapters (near-full quality for a fraction of the memory);
- above ~7B on constrained or consumer hardware: QLoRA (the base frozen in 4 bits);
- extremely large models or minimal resources: prefix or prompt tuning (fewest trainable
  parameters, nothing per layer to store).
The callers pass which methods fit the memory they have; the framework's first choice that fits
is recommended, and every step down the list says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BILLION = 1_000_000_000


@dataclass
class Recommendation:
    method: str | None
    reason: str
    # The framework's preference order for this model size, best first.
    preference: list[str] = field(default_factory=list)
    # Methods passed over because they do not fit, in preference order.
    ruled_out: list[str] = field(default_factory=list)


def preference_order(total_parameters: int, constrained: bool) -> tuple[list[str], str]:
    """The framework's order of methods for a model of this size, and the rule that chose it."""
    if total_parameters < BILLION and not constrained:
        return (["full", "lora", "adapter", "ia3", "prefix", "prompt"],
                "below ~1B parameters with ample resources: full fine-tuning first")
    if total_parameters <= 13 * BILLION and not (constrained and total_parameters > 7 * BILLION):
        return (["lora", "adapter", "qlora", "ia3", "prefix", "prompt", "full"],
                "~1B-13B parameters (or constrained memory): LoRA or adapters first")
    if total_parameters <= 70 * BILLION:
        return (["qlora", "lora", "prefix", "prompt", "ia3"],
                "above ~7B parameters on constrained hardware: QLoRA first")
    return (["prefix", "prompt", "qlora", "ia3", "lora"],
            "extremely large model: prefix or prompt tuning first")


def recommend(total_parameters: int, fits: dict[str, bool], constrained: bool) -> Recommendation:
    """The first method in the framework's order whose entry in `fits` is true.

    `fits` maps method name to whether it fits the user's memory (methods absent from it are
    skipped); `constrained` says the memory is tight (e.g. full fine-tuning does not fit, or a
    budget below the model's fp32 training footprint was given)."""
    order, rule = preference_order(total_parameters, constrained)
    ruled_out = []
    for method in order:
        if method not in fits:
            continue
        if fits[method]:
            suffix = f"; ruled out (do not fit): {', '.join(ruled_out)}" if ruled_out else ""
            return Recommendation(method, f"{rule}{suffix}", order, ruled_out)
        ruled_out.append(method)
    return Recommendation(None, f"{rule}; nothing fits: lower the batch size or sequence length, "
                                "or use a machine with more memory", order, ruled_out)
