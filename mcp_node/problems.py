"""Every rule break of one input at once, and unknown keys named with the nearest known
one: a definition or ``mcp.toml`` with two typos is fixed in one pass, not two.

A leaf (``mcp`` reads its config through it on every call): difflib is imported only
when a key is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from .errors import ValidationError, ValidationErrors

T = TypeVar("T")


def unknown_key(key: str, known: Iterable[str], field: str) -> ValidationError:
    """``unknown key 'imgae' (did you mean 'image'?)``, else the known keys listed."""
    import difflib

    names = list(known)
    near = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(names)}"
    return ValidationError(f"unknown key {key!r} ({hint})", field)


class Problems:
    """Collects the errors of independent checks; ``done`` raises them (one as itself)."""

    def __init__(self) -> None:
        self.errors: list[ValidationError] = []

    def add(self, exc: ValidationError) -> None:
        self.errors.extend(exc.errors if isinstance(exc, ValidationErrors) else [exc])

    @overload
    def take(self, check: Callable[[], T]) -> T | None: ...
    @overload
    def take(self, check: Callable[[], T], fallback: Any) -> T: ...

    def take(self, check: Callable[[], T], fallback: Any = None) -> T | None:
        """``check()``, or ``fallback`` with its error kept: the checks after it go on,
        and ``done`` raises before a fallback is used for anything but more checks."""
        try:
            return check()
        except ValidationError as exc:
            self.add(exc)
            return fallback  # type: ignore[no-any-return]

    def keys(self, data: dict[str, Any], known: Iterable[str], where: str) -> None:
        """Each key of ``data`` not in ``known``, in the order given."""
        names = tuple(known)
        self.errors.extend(unknown_key(k, names, f"{where}{k}") for k in data
                           if k not in names)

    def done(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ValidationErrors(self.errors)
