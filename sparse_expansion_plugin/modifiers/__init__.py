"""Registration of the package's llm-compressor modifiers by name, for YAML recipes.

llm-compressor 0.14 finds a recipe's ``SparseGPTModifier:`` by walking its own
package (``ModifierFactory.refresh``); an out-of-tree modifier is found only
once ``ModifierFactory.register(name, cls)`` has been called, and the factory
offers no entry point or plugin discovery. Registering means importing
llm-compressor (about 7 s, and it prints "No accelerator available!"), so
``import sparse_expansion_plugin`` must not do it eagerly. Instead
:func:`register_modifiers_when_llmcompressor_loads` registers

- at once, when llm-compressor is already imported;
- otherwise right after the ``llmcompressor`` package finishes importing,
  through a one-shot import hook (a ``sys.meta_path`` finder that wraps the
  loader of that one module and removes itself when it has found it).

Nothing of llm-compressor is replaced; the only change is the entries
``ModifierFactory.register`` itself makes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

MODIFIER_MODULES: dict[str, str] = {
    # name in a recipe -> module that defines the class of that name
    "WassersteinSparseGPTModifier": "sparse_expansion_plugin.wd_sparsegpt.modifier",
    "SparseExpansionModifier": "sparse_expansion_plugin.sparse_expansion.modifier",
}

_TRIGGER = "llmcompressor"
"""The module whose import triggers registration: the top-level package, so that our modifier
modules (which import llm-compressor submodules) run only once it is fully initialised."""


def register_modifiers() -> None:
    """Register every modifier with llm-compressor's ``ModifierFactory`` (idempotent).

    Out-of-tree modifiers are not found by name from a YAML recipe unless
    registered; instances passed to ``oneshot(recipe=[...])`` need nothing.
    Imports llm-compressor.
    """
    for name in MODIFIER_MODULES:
        _register(name)


def _register(name: str) -> None:
    from llmcompressor.modifiers.factory import ModifierFactory

    cls = getattr(importlib.import_module(MODIFIER_MODULES[name]), name)
    if ModifierFactory._registered_registry.get(name) is not cls:
        ModifierFactory.register(name, cls)


def register_modifier(name: str, cls: type) -> None:
    """Register ``cls`` under ``name`` if llm-compressor's factory is loaded; called at the end of each
    modifier module. Why: when a modifier module is the first import of a process, its own import of
    llm-compressor fires the import hook while the module is half-executed (the class does not exist
    yet), so the hook skips it and the module registers itself once its class is defined."""
    factory = sys.modules.get("llmcompressor.modifiers.factory")
    if factory is not None and factory.ModifierFactory._registered_registry.get(name) is not cls:
        factory.ModifierFactory.register(name, cls)


def _being_imported(name: str) -> bool:
    """Whether the module defining ``name`` is half-way through its own import (it registers itself)."""
    module = sys.modules.get(MODIFIER_MODULES[name])
    return module is not None and not hasattr(module, name)


def _register_after_import() -> None:
    """Registration run from the import hook: a failure warns and never breaks the user's llm-compressor import."""
    for name in MODIFIER_MODULES:
        if _being_imported(name):
            continue
        try:
            _register(name)
        except Exception as error:  # noqa: BLE001  (a failure of ours must not fail `import llmcompressor`)
            warnings.warn(
                f"sparse_expansion_plugin could not register the llm-compressor modifier {name} "
                f"({type(error).__name__}: {error}); recipes naming it will fail. "
                "sparse_expansion_plugin.modifiers.register_modifiers() shows the full error",
                RuntimeWarning,
                stacklevel=2,
            )


class _RegisteringLoader(importlib.abc.Loader):
    """The trigger module's own loader, plus registration once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_after_import()

    def __getattr__(self, name: str) -> object:
        # get_resource_reader, get_filename, is_package...: whatever the real loader offers.
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot ``sys.meta_path`` finder: finds nothing itself; wraps the loader of ``_TRIGGER``, then leaves."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TRIGGER:
            return None
        _uninstall(self)
        spec = None
        for finder in sys.meta_path:  # the finders that would have answered without us
            find = getattr(finder, "find_spec", None)
            if find is not None and (spec := find(fullname, path, target)) is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # not installed, or a loader we cannot wrap: import proceeds as without us
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _uninstall(finder: _RegisterOnImport) -> None:
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def _hook_installed() -> bool:
    return any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path)


def register_modifiers_when_llmcompressor_loads() -> None:
    """Make our modifiers resolvable from YAML recipes without importing llm-compressor now (idempotent).

    Registers at once if llm-compressor is already imported, else installs the
    one-shot import hook described in the module docstring.
    """
    if _TRIGGER in sys.modules:
        register_modifiers()
    elif not _hook_installed():
        sys.meta_path.insert(0, _RegisterOnImport())
