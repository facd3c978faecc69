"""Files: written so that a crash never leaves a half-written one, read so that a damaged one gives a
one-line error naming it (a ``ValueError``, which the CLI reports with exit code 2)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path


class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto ``path`` on success."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_file(path: str | os.PathLike, write) -> Path:
    """Write ``path`` atomically through ``write(binary_file)``; an OS error (a full disk ...) names ``path``."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    return path


def write_json(path: str | os.PathLike, obj, **dumps) -> Path:
    """``obj`` as indented JSON at ``path``, atomically."""
    text = json.dumps(obj, indent=2, **dumps).encode()
    return write_file(path, lambda f: f.write(text))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file ({what})")


def read_json(path: str | os.PathLike, what: str = "JSON", expect: type | tuple[type, ...] = dict):
    """The JSON value in ``path``, of type ``expect`` (an object by default); a missing, empty or
    malformed file is a one-line error."""
    path = Path(path)
    _require(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({_first_line(e)}); the {what} is damaged") from None
    if not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise ValueError(f"{path}: expected a JSON {names} ({what}), found {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """The tensors of a ``.safetensors`` file; a truncated or damaged file is a one-line error."""
    from safetensors.torch import load_file

    path = Path(path)
    _require(path, "model weights")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # SafetensorError: incomplete metadata, header too small, ...
        raise ValueError(f"{path}: damaged weights file ({_first_line(e)}); it cannot be loaded") from None


def read_torch(path: str | os.PathLike, what: str = "checkpoint", safe_globals: list | None = None):
    """``torch.load(path, weights_only=True)`` on the CPU: nothing that can run code is unpickled; a
    truncated file or one holding pickled code is a one-line error."""
    import torch

    path = Path(path)
    _require(path, what)
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, PytorchStreamReader failures, not a torch file at all
        raise ValueError(f"{path}: cannot be read as a weights-only {what} ({type(e).__name__}: {_first_line(e)})"
                         ) from None


def describe_os_error(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming the file and the reason of an OS error ("No space left on device" ...)."""
    where = e.filename or path or ""
    reason = os.strerror(e.errno) if e.errno else _first_line(e)
    if e.errno == errno.ENOSPC:
        reason += " (free some space, then resume)"
    return f"{where}: {reason}" if where else reason


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder to write into, made if missing; a file there is a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: is a file, not a folder ({what}); choose another path")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"{path}: {blocking} is a file, not a folder ({what}); choose another path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def guard_outputs(outputs: list[Path], inputs: list[Path], *, overwrite: bool = False,
                  skip_existing: bool = False) -> set[Path]:
    """Check ``outputs`` before anything is written: none may be an input or lie inside an input
    folder, and none may exist unless ``overwrite`` (replace) or ``skip_existing`` (keep: complete,
    since every output is written atomically). Returns the outputs to skip."""
    if overwrite and skip_existing:
        raise ValueError("--overwrite and --skip-existing exclude each other")
    for out in outputs:
        clash = next((i for i in inputs if is_inside(out, i) or is_inside(i, out)), None)
        if clash is not None:
            raise ValueError(f"{out}: an output must not be an input, nor lie inside or around one ({clash})")
    existing = [o for o in outputs if o.exists()]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"{len(existing)} output(s) exist, e.g. {existing[0]}; pass --overwrite to replace "
                              "them or --skip-existing to keep them")
    return set(existing) if skip_existing else set()
