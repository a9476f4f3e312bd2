"""The dependency rules of docs/architecture.md, checked on the source: the library never imports
the command line, the loop knows no method, evaluation knows no training, and job code asks task
objects instead of comparing task names."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deltatune"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("folder,forbidden", [
    ("", "deltatune.cli"), ("train", "deltatune.methods"), ("train", "deltatune.jobs"),
    ("eval", "deltatune.train"), ("eval", "deltatune.jobs"), ("data", "deltatune.train"),
    ("data", "deltatune.jobs"), ("methods", "deltatune.train"), ("methods", "deltatune.jobs"),
    ("models", "deltatune.train"), ("models", "deltatune.jobs"),
    ("quant", "deltatune.models"), ("quant", "deltatune.methods"), ("quant", "deltatune.train"),
    ("quant", "deltatune.jobs"), ("quant", "deltatune.data"),
    ("compress", "deltatune.jobs"), ("compress", "deltatune.methods"),
    ("compress", "deltatune.cli"),
    ("models", "deltatune.compress"),
    ("forgetting", "deltatune.jobs"), ("eval", "deltatune.forgetting"),
    ("serve", "deltatune.train"), ("serve", "deltatune.jobs"), ("serve", "deltatune.compress"),
    ("serve", "deltatune.forgetting"),
])
def test_no_module_reaches_back_up_the_chain(folder, forbidden):
    offenders = [str(path.relative_to(PACKAGE)) for path in _files(folder)
                 if path.name not in ("cli.py", "__main__.py")
                 and any(name == forbidden or name.startswith(forbidden + ".")
                         for name in _imports(path))]
    assert offenders == []


def test_job_code_never_compares_task_names():
    pattern = re.compile(r"""task\s*[!=]=\s*["']|["'](causal-lm|classification|text)["']\s*[!=]=""")
    offenders = [str(path.relative_to(PACKAGE)) for path in _files("jobs") + _files("train")
                 if pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("module", ["deltatune.spec", "deltatune.jobs.tasks", "deltatune.cli",
                                    "deltatune.train.loop", "deltatune.eval.evaluate",
                                    "deltatune.models.fused_loss", "deltatune.data",
                                    "deltatune.serve.engine"])
def test_each_entry_module_imports_first_in_a_fresh_interpreter(module):
    """Import cycles only show when a module is the first one imported."""
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                               text=True, timeout=120, cwd=PACKAGE.parent)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_lazy_package_exports_are_not_shadowed_by_submodules():
    """Importing a submodule sets it as an attribute of its package, which would replace a lazily
    exported function of the same name (`deltatune.jobs.prepare` once did)."""
    import subprocess
    import sys

    script = ("import importlib, pkgutil, deltatune.jobs as jobs\n"
              "for info in pkgutil.walk_packages(jobs.__path__, 'deltatune.jobs.'):\n"
              "    importlib.import_module(info.name)\n"
              "bad = [name for name in jobs.__all__ if not callable(getattr(jobs, name))]\n"
              "assert not bad, bad\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=120, cwd=PACKAGE.parent)
    assert completed.returncode == 0, completed.stderr[-2000:]
