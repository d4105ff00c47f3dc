"""Remote-code entry point of a Sparse Expansion model (copied next to its config.json).

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and
``lm_eval --model hf --model_args pretrained=dir,trust_remote_code=True``)
arrives here; the real work is ``sparse_expansion_plugin.load_expanded``, so
the package must be installed (``pip install sparse-expansion-plugin``).

Why a plain class and not a ``PreTrainedModel``: the returned model is the base
architecture (e.g. ``LlamaForCausalLM``) with expanded MLP linears. transformers
registers a remote class for the config's class (``LlamaConfig``) process-wide;
we undo that after loading so later plain Llama loads are not routed here.
"""

from __future__ import annotations


class SparseExpansionForCausalLM:
    """Loader shim: ``from_pretrained`` returns the base architecture with expanded MLP linears."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):  # noqa: ANN001, ANN206
        """Nothing to register: the model returned is a transformers class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # noqa: ANN001, ANN206
        from transformers import AutoModelForCausalLM

        from sparse_expansion_plugin.sparse_expansion.model import load_expanded

        extra = AutoModelForCausalLM._model_mapping._extra_content
        for config_class, model_class in list(extra.items()):
            if getattr(model_class, "__name__", "") == cls.__name__:
                del extra[config_class]
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map")
        if isinstance(device, dict):  # a single device: expanded models are loaded whole
            device = next(iter(device.values()), None)
        if device == "auto":
            device = None
        return load_expanded(pretrained_model_name_or_path, device=device, dtype=dtype)
