"""The record of every HF attribute pcg replaced, so that `disable()` can put each one back.

Adapters never assign to transformers directly: they call `PATCHES.wrap`
(an attribute of a class or module), `PATCHES.wrap_item` (an entry of a
dict such as `ALL_ATTENTION_FUNCTIONS._global_mapping`) or `PATCHES.mark`
(a new attribute of pcg's own on a class). Each call keeps the
original object, and `restore_all` puts the originals back in reverse order,
so after `disable()` every patched attribute is the very object it was
before (`is`, not only equal).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

log = logging.getLogger("pcg_backend")

_MISSING = object()


@dataclasses.dataclass
class Patch:
    """One replaced attribute (or dict entry) and what it held before."""

    owner: Any          # a class, a module, or a dict for `wrap_item`
    name: str
    original: Any       # `_MISSING` when the attribute was inherited, not set on `owner` itself
    wrapper: Any
    is_item: bool

    def current(self) -> Any:
        if self.is_item:
            return self.owner.get(self.name, _MISSING)
        return vars(self.owner).get(self.name, _MISSING)

    def restore(self) -> None:
        if self.current() is not self.wrapper:
            # Someone replaced our wrapper after us; putting our original back would drop their change.
            log.warning("pcg: %r.%s was replaced after pcg wrapped it; leaving it as it is", self.owner, self.name)
            return
        if self.is_item:
            if self.original is _MISSING:
                del self.owner[self.name]
            else:
                self.owner[self.name] = self.original
        elif self.original is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.original)


class Patches:
    """Every attribute pcg has replaced, in the order it replaced them."""

    def __init__(self) -> None:
        self._patches: list[Patch] = []
        self._keys: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return len(self._patches)

    def is_patched(self, owner, name: str) -> bool:
        return (id(owner), name) in self._keys

    def wrap(self, owner, name: str, make_wrapper: Callable[[Any], Any]) -> bool:
        """Replace `owner.name` by `make_wrapper(current value)`; False if pcg already did."""
        if self.is_patched(owner, name):
            return False
        current = getattr(owner, name)
        original = vars(owner).get(name, _MISSING)
        inner = getattr(current, "_pcg_original", None)
        if inner is not None:
            # Already a pcg wrapper: a modeling module imported the function from another
            # module while routing was on. Record it, so that `restore_all` binds the original.
            if original is not _MISSING:
                self._add(Patch(owner, name, inner, current, is_item=False))
            return False
        wrapper = self._mark(make_wrapper(current), current)
        setattr(owner, name, wrapper)
        self._add(Patch(owner, name, original, wrapper, is_item=False))
        return True

    def mark(self, owner, name: str, value: Any) -> bool:
        """Set `owner.name = value` where `owner` itself has no such attribute; False if pcg already did.
        `restore_all` deletes it again."""
        if self.is_patched(owner, name):
            return False
        if name in vars(owner):
            raise ValueError(f"pcg: {owner!r} already has its own attribute {name!r}")
        setattr(owner, name, value)
        self._add(Patch(owner, name, _MISSING, value, is_item=False))
        return True

    def wrap_item(self, mapping: dict, key: str, make_wrapper: Callable[[Any], Any]) -> bool:
        """Replace `mapping[key]` by `make_wrapper(mapping[key])`; False if pcg already did or there is none."""
        if self.is_patched(mapping, key) or key not in mapping:
            return False
        original = mapping[key]
        wrapper = self._mark(make_wrapper(original), original)
        mapping[key] = wrapper
        self._add(Patch(mapping, key, original, wrapper, is_item=True))
        return True

    @staticmethod
    def _mark(wrapper, original):
        wrapper._pcg_original = original
        return wrapper

    def _add(self, patch: Patch) -> None:
        self._patches.append(patch)
        self._keys.add((id(patch.owner), patch.name))

    def restore_all(self) -> int:
        """Put every original back, newest first; returns how many patches were undone."""
        count = len(self._patches)
        while self._patches:
            self._patches.pop().restore()
        self._keys.clear()
        return count


PATCHES = Patches()
