"""llm-compressor modifiers of the package, registered by name for YAML recipes."""

from __future__ import annotations

MODIFIER_MODULES: dict[str, str] = {
    # name in a recipe -> module that defines the class of that name
    "WassersteinSparseGPTModifier": "sparse_expansion_plugin.wd_sparsegpt.modifier",
    "SparseExpansionModifier": "sparse_expansion_plugin.sparse_expansion.modifier",
}


def register_modifiers() -> None:
    """Register every modifier with llm-compressor's ``ModifierFactory`` (idempotent).

    Out-of-tree modifiers are not found by name from a YAML recipe unless
    registered; instances passed to ``oneshot(recipe=[...])`` need nothing.
    """
    import importlib

    from llmcompressor.modifiers.factory import ModifierFactory

    for name, module_name in MODIFIER_MODULES.items():
        cls = getattr(importlib.import_module(module_name), name)
        if ModifierFactory._registered_registry.get(name) is not cls:
            ModifierFactory.register(name, cls)
