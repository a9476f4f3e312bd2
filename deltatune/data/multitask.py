"""The `multitask:` section of a run config: several data sets trained in one run, each with a
name (its task identifier: a text prefix on every record, and the prefix of its metrics) and its
own `data:` settings; batches mix them by temperature sampling (deltatune.data.mixing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import ConfigDict, Field

from deltatune.data.dataset import DataConfig


@dataclass
class MultitaskEntry:
    __pydantic_config__ = ConfigDict(extra="forbid")

    name: str
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class MultitaskConfig:
    """`tasks` replace the run's `data:` section. `temperature` T: task i is drawn with
    probability proportional to n_i^(1/T) (1: proportional to size; large: uniform).
    `prefix`: put "<name>: " in front of every record so the model sees the task identifier."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    tasks: list[MultitaskEntry] = field(default_factory=list)
    temperature: Annotated[float, Field(gt=0)] = 1.0
    prefix: bool = True

    def prefix_for(self, entry: MultitaskEntry) -> str | None:
        return f"{entry.name}: " if self.prefix else None
