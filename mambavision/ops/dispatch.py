"""How every op picks its backend at call time: one optional-import cache and one resolution rule.

``backend=`` (or the op's environment variable) is ``"auto"``, ``"torch"`` or the op's fast
backend (``"cuda"`` / ``"triton"``). ``auto`` takes the fast one when it can run on these tensors;
forcing it when it cannot is an error that says why.
"""
import functools
import importlib
import os
from typing import Callable, Optional

_IMPORT_ERRORS = {}


@functools.lru_cache(maxsize=None)
def optional_import(module: str, attr: str):
    """``module.attr``, or None when it cannot be imported (the reason is kept for error messages)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, or OSError / undefined symbols from a mismatched CUDA build
        _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
        return None


def import_error(module: str) -> str:
    """Why :func:`optional_import` of ``module`` failed ('' if it did not)."""
    return _IMPORT_ERRORS.get(module, "")


def choose_backend(op: str, backend: Optional[str], env_var: str, fast: str, fast_ok: bool,
                   why_not: Callable[[], str]) -> str:
    """Resolve ``backend`` (else ``$env_var``, else ``auto``) to ``fast`` or ``"torch"``."""
    choice = (backend or os.environ.get(env_var) or "auto").lower()
    allowed = ("auto", fast, "torch")
    if choice not in allowed:
        raise ValueError(f"unknown {op} backend {choice!r} (from backend= or ${env_var}); expected one of {allowed}")
    if choice == "auto":
        return fast if fast_ok else "torch"
    if choice == fast and not fast_ok:
        raise RuntimeError(f"{op} backend {fast!r} was requested but {why_not()}")
    return choice
