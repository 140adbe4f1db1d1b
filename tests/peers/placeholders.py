"""Import the real verl / TRL / OpenRLHF on a CPU machine that lacks their heavy runtime dependencies.

The peers' hot-path functions are plain PyTorch, but the modules that define them import, at module
level, packages a CPU test machine cannot or should not install (ray, deepspeed, vllm, flash-attn, ...).
For the import alone, :func:`importing_peers` serves those names from placeholder modules: every
attribute of a placeholder is a placeholder class, calling one with a single function or class returns
it unchanged (so ``@ray.remote`` and ``@ray.remote(num_gpus=1)`` leave the decorated object as it is),
and subclassing one works.  Nothing a test runs comes from a placeholder: the function bodies the
parity tests call are the peers' own, unmodified, and when a peer body reaches for one of these
packages at call time (``from flash_attn.ops.triton.cross_entropy import ...`` inside
``try/except ImportError``), the import fails as it would on any machine without it, because the
placeholders are removed from ``sys.modules`` as soon as the peers are imported.

A placeholder is only ever served for a name that is not installed for real.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# The only modules served as placeholders, by package, with the reason.  Each is imported at module level
# by a peer module the suite needs, and used there only in decorators, annotations or code paths the suite
# does not run ("pkg.*": any submodule).  Submodules not listed are not served: a guarded
# ``try: from flash_attn.ops... import`` then fails as on any machine without flash-attn, so the peers
# take their PyTorch paths.
HEAVY = {
    "ray": (("ray", "ray.*"), "verl.protocol and openrlhf.trainer.* import it for their distributed workers"),
    "deepspeed": (
        ("deepspeed", "deepspeed.*"),
        "openrlhf.models.utils / openrlhf.trainer.ray.ppo_actor import it (ZeRO-3)",
    ),
    "vllm": (
        ("vllm", "vllm.*"),
        "openrlhf.trainer.ray (the package of the PPO actor) imports its rollout engines",
    ),
    "flash_attn": (
        ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed"),
        "openrlhf.models.ring_attn_utils imports its padding helpers (CUDA build)",
    ),
}
SERVABLE = {name for modules, _ in HEAVY.values() for name in modules}


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder_class(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and (callable(args[0]) or isinstance(args[0], type)):
            return args[0]  # used as a decorator: leave the decorated object unchanged
        return _placeholder_class(f"{cls.__qualname__}()")

    def __iter__(cls):
        return iter(())

    def __bool__(cls):
        return False

    def __or__(cls, other):  # type annotations such as ``ray.ObjectRef | None``
        return cls

    __ror__ = __or__

    def __getitem__(cls, item):  # ``ray.ObjectRef[int]``
        return cls


def _placeholder_class(qualname: str) -> type:
    return _PlaceholderMeta(
        qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__placeholder__": True}
    )


class _PlaceholderModule(types.ModuleType):
    __placeholder__ = True

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _placeholder_class(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a placeholder for ``HEAVY`` names (and their submodules) that are not installed."""

    def __init__(self) -> None:
        self.served: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.split(".", 1)[0]
        if fullname not in SERVABLE and f"{root}.*" not in SERVABLE:
            return None
        if importlib.machinery.PathFinder.find_spec(fullname.split(".", 1)[0]) is not None:
            return None  # installed for real: use it
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+placeholder"
        return module

    def exec_module(self, module):
        self.served.append(module.__name__)


@contextlib.contextmanager
def _placeholders():
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in finder.served:  # later imports of these names fail as they normally would
            sys.modules.pop(name, None)


SERVED: set[str] = set()


def import_peer(module: str) -> types.ModuleType:
    """``importlib.import_module(module)`` with placeholders for the missing ``HEAVY`` packages."""
    if module in sys.modules:
        return sys.modules[module]
    with _placeholders() as finder:
        imported = importlib.import_module(module)
    SERVED.update(finder.served)
    return imported
