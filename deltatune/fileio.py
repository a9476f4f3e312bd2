"""Crash-safe file writing: every file deltatune writes goes to a temporary name in the same
folder and is renamed into place, so a crash never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                         dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage: give it independent copies.
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(plain, str(temporary), metadata=metadata)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends one line in a single write() system call on an O_APPEND descriptor: a process
    killed at any moment (even with SIGKILL) leaves whole lines only."""
    data = (json.dumps(record, default=str) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(descriptor, data)
        while written < len(data):  # only on a full disk or a signal mid-write
            written += os.write(descriptor, data[written:])
    finally:
        os.close(descriptor)


def checked_output_folder(path: str | os.PathLike, overwrite: bool,
                          sources: Iterable[str | os.PathLike | None], what: str) -> Path:
    """The absolute output folder of a command that writes one (`--out`), refused when writing
    it would lose data: a file there, a non-empty folder without `overwrite`, or (with
    `overwrite`) a folder that holds one of the command's own `sources` (`what` names them in
    the message). Its parent is created."""
    from deltatune.errors import ConfigError

    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder path (it is created)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} already holds files; choose a new folder or pass "
                              "--overwrite to replace it")
        for source in sources:
            if source and Path(source).exists() and _inside(Path(source), out):
                raise ConfigError(f"--out {out} holds {what} {source}; --overwrite would "
                                  "delete it: choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _inside(path: Path, folder: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


def move_folder_into_place(folder: Path, out: Path, staging: Path) -> None:
    """Renames a finished `folder` (inside the `staging` folder, on `out`'s file system) onto
    `out`; what `out` held is moved into `staging` first, so the caller deletes it only after
    the new folder is in place."""
    if out.is_dir() and any(out.iterdir()):
        os.rename(out, staging / (out.name + ".replaced"))
    elif out.is_dir():
        out.rmdir()
    os.rename(folder, out)
