"""Task kinds and their registry: one line per kind (module, class), loaded lazily."""
from __future__ import annotations

import importlib

from deltatune.errors import ConfigError
from deltatune.jobs.tasks.base import Task

_TASKS: dict[str, tuple[str, str]] = {
    "causal-lm": ("deltatune.jobs.tasks.causal_lm", "CausalLMTask"),
    "classification": ("deltatune.jobs.tasks.classification", "ClassificationTask"),
    "text": ("deltatune.jobs.tasks.text", "TextTask"),
}


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ConfigError(f"unknown task '{name}'; choose one of: {', '.join(_TASKS)}")
    module, class_name = _TASKS[name]
    return getattr(importlib.import_module(module), class_name)()


__all__ = ["Task", "get_task", "task_names"]
