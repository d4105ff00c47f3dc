"""Remote-code entry point of a Sparse Expansion model (copied next to its config.json).

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and
``lm_eval --model hf --model_args pretrained=dir,trust_remote_code=True``)
arrives here; the real work is ``sparse_expansion_plugin.load_expanded``, so
the package must be installed (``pip install sparse-expansion-plugin``).

Why a config class of our own: config.json says ``model_type:
sparse_expansion`` so that loading *without* remote code fails loudly instead
of building the base model with random MLPs. transformers then needs this
class to read the config; the base architecture's config is rebuilt by the
loader. The model class is a loader shim: ``from_pretrained`` returns the base
architecture (e.g. ``LlamaForCausalLM``) with expanded MLP linears. Nothing of
transformers is modified: the auto classes map *our* config class to the shim.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class SparseExpansionConfig(PretrainedConfig):
    """The saved config.json as transformers reads it; the loader rebuilds the base config from it."""

    model_type = "sparse_expansion"


class SparseExpansionForCausalLM:
    """Loader shim: ``from_pretrained`` returns the base architecture with expanded MLP linears."""

    config_class = SparseExpansionConfig

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):  # noqa: ANN001, ANN206
        """Nothing to register: the model returned is a transformers class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # noqa: ANN001, ANN206
        try:
            from sparse_expansion_plugin.sparse_expansion.model import load_expanded
        except ImportError as error:  # pragma: no cover - depends on the user's environment
            raise ImportError(
                "this is a Sparse Expansion model: `pip install sparse-expansion-plugin` to load it"
            ) from error

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map")
        if isinstance(device, dict):  # a single device: expanded models are loaded whole
            device = next(iter(device.values()), None)
        if device == "auto":
            device = None
        return load_expanded(pretrained_model_name_or_path, device=device, dtype=dtype)
