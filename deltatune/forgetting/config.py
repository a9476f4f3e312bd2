"""The `forgetting:` section of a run config: which mitigations a run uses and how strongly.
Every weight 0 and no replay (the defaults) is ordinary fine-tuning. Each mitigation is a flag of
`deltatune train` too (docs/forgetting.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from deltatune.data.retain import RetainSet


@dataclass
class ForgettingConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    # KL(original || tuned) on the training batch's labelled positions, times this weight
    # (deltatune/forgetting/kl.py); for language models.
    kl_weight: Annotated[float, Field(ge=0)] = 0.0
    kl_temperature: Annotated[float, Field(gt=0)] = 1.0
    # Replay: this share of every micro-batch comes from `replay` (general text or an earlier
    # task), the rest from the training data.
    replay: RetainSet | None = None
    replay_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    # EWC: Fisher-weighted squared distance from the weights training starts from; the Fisher
    # is estimated on `ewc_data` (default: the replay data, else the first retain set).
    ewc_weight: Annotated[float, Field(ge=0)] = 0.0
    ewc_data: RetainSet | None = None
    ewc_batches: Annotated[int, Field(ge=1)] = 32
    # L2-SP: squared distance from the weights training starts from.
    l2sp_weight: Annotated[float, Field(ge=0)] = 0.0
    # The `combined` evaluation metric (lower is better): task loss + this weight times the
    # mean rise of the retain sets' losses (and the probe's KL) over the base model.
    retention_weight: Annotated[float, Field(ge=0)] = 1.0

    @property
    def active(self) -> list[str]:
        """The mitigations switched on, by name."""
        names = []
        if self.kl_weight:
            names.append("kl")
        if self.replay is not None:
            names.append("replay")
        if self.ewc_weight:
            names.append("ewc")
        if self.l2sp_weight:
            names.append("l2sp")
        return names
