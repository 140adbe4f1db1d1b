"""The one mechanism behind ``compat.verl.install()``, ``compat.trl.patch()`` and ``compat.openrlhf.patch()``.

A framework's patch is a list of replacements ``(owner, key, new)``: an attribute of a module or class,
or an entry of a registry dict.  :class:`Patcher` checks the installed version of the framework first
(an unsupported one raises :class:`UnsupportedVersionError` naming it and the supported ones, before
anything changes), resolves every replacement, and only then applies them all, so a patch is never
partial.  It then also replaces the same original objects wherever a loaded module of the framework
imported them by name (``from verl.trainer.ppo.core_algos import agg_loss``): modules imported later
read the patched attribute anyway.  Patching twice is a no-op; :meth:`Patcher.unpatch` puts every
original back (where nothing else replaced ours since).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Patcher", "UnsupportedVersionError", "installed_version"]


class UnsupportedVersionError(RuntimeError):
    """The installed framework is not a version the shims were checked against."""


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip name), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class _Replacement:
    owner: Any  # a module, a class or a registry dict
    key: str
    original: Any
    new: Any

    def read(self) -> Any:
        return self.owner[self.key] if isinstance(self.owner, dict) else getattr(self.owner, self.key)

    def write(self, value: Any) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.key] = value
        else:
            setattr(self.owner, self.key, value)


Plan = Iterable[tuple[Any, str, Any]]


class Patcher:
    """Applies and undoes one framework's replacements.

    Args:
        framework: the name users know (``"verl"``), used in messages.
        distribution: the pip distribution whose version is checked.
        supported: the versions the shims were checked against.
        root: the top-level package whose loaded modules are searched for imported originals.
        plan: builds the replacements ``(owner, key, new)``; it may import the framework's modules.
    """

    def __init__(
        self,
        framework: str,
        distribution: str,
        supported: tuple[str, ...],
        root: str,
        plan: Callable[[], Plan],
    ) -> None:
        self.framework = framework
        self.distribution = distribution
        self.supported = supported
        self.root = root
        self._plan = plan
        self._applied: list[_Replacement] = []

    @property
    def active(self) -> bool:
        return bool(self._applied)

    def check_version(self) -> str:
        version = installed_version(self.distribution)
        if version is None:
            raise UnsupportedVersionError(
                f"{self.framework} is not installed; rlhf_kernels.compat supports {self.framework} "
                f"{', '.join(self.supported)} (pip install {self.distribution}=={self.supported[-1]})"
            )
        if version not in self.supported:
            raise UnsupportedVersionError(
                f"{self.framework} {version} is installed; rlhf_kernels.compat supports {self.framework} "
                f"{', '.join(self.supported)} only (nothing was patched)"
            )
        return version

    def patch(self) -> list[str]:
        """Applies every replacement (once); returns where, as ``"module.attr"`` / ``"REGISTRY[key]"``."""
        if self._applied:
            return self.describe()
        self.check_version()
        planned = []
        for owner, key, new in self._plan():
            replacement = _Replacement(owner, key, None, new)
            replacement.original = replacement.read()  # raises before anything changed
            planned.append(replacement)
        planned += self._imported_copies(planned)
        for replacement in planned:
            replacement.write(replacement.new)
        self._applied = planned
        return self.describe()

    def unpatch(self) -> None:
        """Puts every original back, except where something other than this patch replaced ours since."""
        for replacement in reversed(self._applied):
            if replacement.read() is replacement.new:
                replacement.write(replacement.original)
        self._applied = []

    def describe(self) -> list[str]:
        return [_where(r.owner, r.key) for r in self._applied]

    def _imported_copies(self, planned: list[_Replacement]) -> list[_Replacement]:
        """Module-level names bound to a replaced original in the framework's loaded modules."""
        by_original = {id(r.original): r for r in planned if not isinstance(r.owner, dict)}
        seen = {(id(r.owner), r.key) for r in planned}
        copies = []
        for name, module in list(sys.modules.items()):
            if module is None or not (name == self.root or name.startswith(self.root + ".")):
                continue
            for key, value in list(vars(module).items()):
                replacement = by_original.get(id(value))
                if replacement is None or replacement.original is not value or (id(module), key) in seen:
                    continue
                if getattr(value, "__module__", None) == name:
                    continue  # where it is defined: that module's own name for it stays the original
                copies.append(_Replacement(module, key, value, replacement.new))
                seen.add((id(module), key))
        return copies


def import_modules(*names: str):
    """The named modules, imported (each one must import: a missing one fails the whole patch)."""
    return [importlib.import_module(name) for name in names]


def _where(owner: Any, key: str) -> str:
    if isinstance(owner, dict):
        return f"registry[{key!r}]"
    name = getattr(owner, "__module__", None) if isinstance(owner, type) else None
    prefix = f"{name}.{owner.__qualname__}" if name else getattr(owner, "__name__", repr(owner))
    return f"{prefix}.{key}"
