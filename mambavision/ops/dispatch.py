"""How every op picks its backend at call time: one optional-import cache and one resolution rule.

``backend=`` (or the op's environment variable) is ``"auto"``, ``"torch"`` or one of the op's fast
backends (``"cuda"`` / ``"triton"``), which are listed in order of preference. ``auto`` takes the
first one that can run on these tensors, else torch; forcing one that cannot is an error that says why.
"""
import importlib
import os
from typing import Callable, Optional, Sequence, Tuple

_IMPORT_ERRORS = {}
# A plain dict rather than functools.lru_cache: torch.compile traces a lookup in it (the import itself
# happened when the backend was chosen), where it would break the graph on lru_cache's wrapper.
_IMPORTED = {}


def optional_import(module: str, attr: str):
    """``module.attr``, or None when it cannot be imported (the reason is kept for error messages)."""
    if (module, attr) not in _IMPORTED:
        try:
            _IMPORTED[module, attr] = getattr(importlib.import_module(module), attr)
        except Exception as e:  # ImportError, or OSError / undefined symbols from a mismatched CUDA build
            _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
            _IMPORTED[module, attr] = None
    return _IMPORTED[module, attr]


def import_error(module: str) -> str:
    """Why :func:`optional_import` of ``module`` failed ('' if it did not)."""
    return _IMPORT_ERRORS.get(module, "")


def choose_backend(op: str, backend: Optional[str], env_var: str,
                   fast: Sequence[Tuple[str, bool, Callable[[], str]]]) -> str:
    """Resolve ``backend`` (else ``$env_var``, else ``auto``) to a fast backend's name or ``"torch"``.

    ``fast`` lists ``(name, usable_here, why_not)`` in order of preference; ``why_not()`` explains
    an unusable one when it is forced.
    """
    choice = (backend or os.environ.get(env_var) or "auto").lower()
    allowed = ("auto",) + tuple(sorted(name for name, _, _ in fast)) + ("torch",)  # stable whatever the preference
    if choice not in allowed:
        raise ValueError(f"unknown {op} backend {choice!r} (from backend= or ${env_var}); expected one of {allowed}")
    if choice == "auto":
        return next((name for name, ok, _ in fast if ok), "torch")
    for name, ok, why_not in fast:
        if choice == name and not ok:
            raise RuntimeError(f"{op} backend {name!r} was requested but {why_not()}")
    return choice
