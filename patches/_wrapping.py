"""What the three patches share: the outcome record, and how a wrapper is installed, recognised
and removed, so that applying twice wraps once and tests can undo a patch exactly."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

LOG = logging.getLogger("patches")

APPLIED = "applied"
UPSTREAM_FIXED = "already fixed upstream"
NOT_FOUND = "target not found"
STATUSES = (APPLIED, UPSTREAM_FIXED, NOT_FOUND)

# Set on every wrapper we install; its value is the patch's name.
MARK = "__stem_service_patch__"


@dataclass(frozen=True)
class Outcome:
    """What one patch did: `status` is one of STATUSES, `detail` says where or why."""

    name: str
    status: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.status} ({self.detail})"


def defining_class(cls: type, attr: str) -> Optional[type]:
    """The class in `cls`'s MRO whose own namespace defines `attr` (a mixin in split layouts)."""
    return next((c for c in cls.__mro__ if attr in c.__dict__), None)


def our_wrapper(owner: type, attr: str, name: str) -> Optional[Callable]:
    """The wrapper this patch installed on `owner.attr`, or None when it is not installed."""
    current = owner.__dict__.get(attr)
    return current if getattr(current, MARK, None) == name else None


def install(owner: type, attr: str, name: str, wrapper: Callable) -> None:
    """Put `wrapper` (made with functools.wraps, so it has `__wrapped__`) on `owner.attr`."""
    if not hasattr(wrapper, "__wrapped__"):
        raise TypeError(f"patch {name}: the wrapper must come from functools.wraps")
    setattr(wrapper, MARK, name)
    setattr(owner, attr, wrapper)


def remove(owner: type, attr: str, name: str) -> bool:
    """Put the original function back; False when this patch was not installed there."""
    current = our_wrapper(owner, attr, name)
    if current is None:
        return False
    setattr(owner, attr, current.__wrapped__)
    return True


def locate(name: str, attr: str, found: tuple[Optional[type], str]) -> tuple[Optional[type], str, Optional[Outcome]]:
    """The start every apply() shares: from find_owner's (owner, where), the owner to patch, or the
    Outcome that ends apply() at once (target not found, or already wrapped in this process)."""
    owner, where = found
    if owner is None:
        return None, where, Outcome(name, NOT_FOUND, where)
    if our_wrapper(owner, attr, name) is not None:
        return owner, where, Outcome(name, APPLIED, f"{where} was already wrapped in this process; not wrapped again")
    return owner, where, None
