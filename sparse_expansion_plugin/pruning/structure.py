"""The one validator of what a pruning recipe may ask for: a sparsity and an N:M mask structure.

Why one place: the modifiers (pydantic field validators), recipe validation
and the solver all accept the same spellings and must give the same error.
"""

from __future__ import annotations

import re

_MASK_STRUCTURE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_mask_structure(value: object) -> tuple[int, int]:
    """``(N, M)`` of an ``"N:M"`` string (N zeros in every M weights); ``"0:0"`` is unstructured.

    Raises ``ValueError`` naming the value and the accepted forms.
    """
    match = _MASK_STRUCTURE.match(str(value))
    if match is None:
        raise ValueError(
            f"mask_structure must look like 'N:M' (e.g. '2:4', or '0:0' for unstructured), got {value!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    check_prune_nm(n, m, value)
    return n, m


def check_prune_nm(prune_n: int, prune_m: int, spelled: object | None = None) -> None:
    """Raise unless ``0 < N < M`` or ``N = M = 0`` (the solver's own guard, same message)."""
    if (prune_n, prune_m) != (0, 0) and not 0 < prune_n < prune_m:
        shown = spelled if spelled is not None else f"{prune_n}:{prune_m}"
        raise ValueError(
            f"mask_structure 'N:M' needs 0 < N < M (N zeros in every M weights, e.g. '2:4') "
            f"or '0:0' for unstructured, got {shown!r}"
        )


def normalized_mask_structure(value: object) -> str:
    """The canonical ``"N:M"`` spelling of a valid mask structure (``" 2 : 4"`` -> ``"2:4"``)."""
    n, m = parse_mask_structure(value)
    return f"{n}:{m}"


def check_sparsity(value: object) -> float:
    """One sparsity as a float in [0, 1); raises naming the value (bools, lists and None refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"sparsity must be one number in [0, 1) (0.5 prunes half of the weights), got {value!r}"
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1) (0.5 prunes half of the weights), got {value!r}")
    return float(value)
