"""Optional dependencies: a clear message, with the command that installs them, when one is missing.

Example:
    >>> onnx = require("onnx", extra="export", purpose="ONNX export")
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional dependency is not installed (the message says how to install it)."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or :class:`MissingDependency` naming the extra to install (under the
    constraints that keep PyTorch the CPU build the README installs)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{purpose} needs the optional package {module.split('.')[0]!r} ({e}); install the {extra!r} extra: "
            f".venv/bin/pip install -c constraints.txt -e '.[{extra}]'") from None
