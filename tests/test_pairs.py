"""Token-pair analysis against a slow, obvious implementation (python loops, ``statistics``)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sparse_expansion_plugin.analysis.pairs import (
    analyze_pairs,
    capture_at_tokens,
    check_layer,
    pair_modules,
    pair_records,
)
from sparse_expansion_plugin.outputs import MARKER

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_llama  # noqa: E402
from test_ablation import short_windows, tiny_model_dir  # noqa: E402,F401  (fixture)


def full_capture(
    model: nn.Module, ids: torch.Tensor, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every token's input and output of each named module, one forward over all windows."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(
                n, (a[0].reshape(-1, a[0].shape[-1]), out.reshape(-1, out.shape[-1]))
            )
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def slow_oi(x: list[list[float]], y: list[list[float]], pairs: list[tuple[int, int]]) -> list[list[float]]:
    """OI ratio [pair][neuron] with python floats: (|dy| / median |dy|) / (||dx|| / max ||dx||)."""
    dx = [math.sqrt(sum((u - v) ** 2 for u, v in zip(x[a], x[b], strict=True))) for a, b in pairs]
    dx_max = max(dx)
    out = [[0.0] * len(y[0]) for _ in pairs]
    for j in range(len(y[0])):
        dy = [abs(y[a][j] - y[b][j]) for a, b in pairs]
        med = statistics.median(dy)
        for i in range(len(pairs)):
            out[i][j] = (dy[i] / med) / (dx[i] / dx_max)
    return out


def test_oi_md_pools_and_zscores_match_slow_loops():
    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    k, m, num_pairs = 3, 4, 21  # odd number of pairs: the median is one value, no convention involved
    result = analyze_pairs(model, ids, num_pairs, k, m, seed=5, batch_size=2, progress=False)
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(3)]
    assert result.layer_names == names
    captured = full_capture(model, ids, names)
    pairs = [tuple(p) for p in result.pairs.tolist()]
    assert len({t for p in pairs for t in p}) == 2 * num_pairs  # distinct tokens
    per_layer_z, pools = [], []
    for layer, name in enumerate(names):
        x, y = (t.double().tolist() for t in captured[name])
        oi = slow_oi(x, y, pairs)
        md = [statistics.fmean(oi[i][j] for i in range(num_pairs)) for j in range(len(y[0]))]
        top = sorted(range(len(md)), key=lambda j: -md[j])[:k]
        assert result.top_neurons[layer].tolist() == top
        torch.testing.assert_close(result.md[layer], torch.tensor(md, dtype=torch.float64))
        torch.testing.assert_close(
            result.top_oi[layer], torch.tensor([[oi[i][j] for j in top] for i in range(num_pairs)]).double()
        )
        pool = []
        for rank, j in enumerate(top):
            pool += [(rank, i) for i in sorted(range(num_pairs), key=lambda i: -oi[i][j])[:m]]
        assert result.pools[layer].tolist() == [list(p) for p in pool]
        pools.append(pool)
        # z-score per entangled neuron over all pairs (population sd), averaged over the k neurons
        z = []
        for i in range(num_pairs):
            z.append(
                statistics.fmean(
                    (oi[i][j] - statistics.fmean(r[j] for r in oi)) / statistics.pstdev([r[j] for r in oi])
                    for j in top
                )
            )
        per_layer_z.append(z)
    for s in range(3):
        dists = result.input_distances[s].tolist()
        d_mean, d_sd = statistics.fmean(dists), statistics.pstdev(dists)
        assert result.input_distance_z[s].item() == pytest.approx(
            statistics.fmean((dists[i] - d_mean) / d_sd for _, i in pools[s])
        )
        for layer in range(3):
            expected = statistics.fmean(per_layer_z[layer][i] for _, i in pools[s])
            assert result.zscores[s, layer].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert result.normalized[s, s].item() == pytest.approx(1.0)
        assert result.zscores[s, s] > 0  # the pool is the source layer's own top-OI pairs


def test_capture_at_tokens_equals_full_capture_rows():
    model = make_tiny_llama()
    ids = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([59, 0, 13, 24, 35, 11])
    names = pair_modules(model)
    caps = capture_at_tokens(model, ids, names, positions, batch_size=2, progress=False)
    full = full_capture(model, ids, names)
    for cap in caps:
        torch.testing.assert_close(cap.inputs, full[cap.name][0][positions])
        torch.testing.assert_close(cap.outputs, full[cap.name][1][positions])
    with pytest.raises(ValueError, match="token positions"):
        capture_at_tokens(model, ids, names, torch.tensor([60]), progress=False)


def test_pair_records_tokens_next_tokens_and_sides():
    model = make_tiny_llama()
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    result = analyze_pairs(model, ids, 15, 2, 3, seed=1, progress=False)
    records = pair_records(result, -1, ids)
    assert len(records) == 6
    name = result.layer_names[1]
    y = full_capture(model, ids, [name])[name][1]
    flat = ids.reshape(-1).tolist()
    for r in records:
        assert r.neuron == int(result.top_neurons[1][r.neuron_rank])
        assert r.token_ids == (flat[r.positions[0]], flat[r.positions[1]])
        for p, nxt in zip(r.positions, r.next_token_ids, strict=True):
            assert nxt == (None if p % 10 == 9 else flat[p + 1])
        expected = (y[r.positions[0], r.neuron].item(), y[r.positions[1], r.neuron].item())
        assert r.outputs == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert r.sides == tuple("negative" if v < 0 else "positive" for v in expected)
    oi = [r.oi_ratio for r in records if r.neuron_rank == 0]
    assert oi == sorted(oi, reverse=True)


def test_bad_input_is_a_clear_error():
    model = make_tiny_llama()
    ids = torch.randint(3, 128, (2, 10))
    result = analyze_pairs(model, ids, 5, 2, 2, progress=False)
    for layer in (2, -3, 100):
        with pytest.raises(ValueError, match="out of range"):
            check_layer(result, layer)
    with pytest.raises(ValueError, match="projection 'w1'"):
        pair_modules(model, "w1")
    assert pair_modules(model, "up_proj")[0] == "model.layers.0.mlp.up_proj"
    with pytest.raises(ValueError, match="no feed-forward projections"):
        pair_modules(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="distinct tokens"):
        analyze_pairs(model, ids, 11, 2, 2, progress=False)
    with pytest.raises(ValueError, match="pairs_per_neuron"):
        analyze_pairs(model, ids, 5, 2, 6, progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        analyze_pairs(model, ids, 5, 65, 2, progress=False)


def test_pairs_command_writes_outputs(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from sparse_expansion_plugin.cli import main

    out = tmp_path / "pairs"
    argv = [
        "pairs", str(tiny_model_dir), "--layer", "1", "--output-dir", str(out), "--windows", "4",
        "--seq-len", "32", "--num-pairs", "30", "--neurons", "3", "--pairs-per-neuron", "4", "--plot-neurons", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "pairs.json",
        "pairs.png",
        "zscores.csv",
        "zscores.png",
    ]
    data = json.loads((out / "pairs.json").read_text())
    assert data["layer"] == 1 and len(data["neurons"]) == 3
    pair = data["neurons"][0]["pairs"][0]
    assert len(pair["tokens"]) == 2 and all(isinstance(t, str) and len(t) == 1 for t in pair["tokens"])
    assert len(data["zscores"]) == 2 and data["zscores_normalized"][1][1] == pytest.approx(1.0)
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    bad = ["pairs", str(tiny_model_dir), "--layer", "2", "--output-dir", str(tmp_path / "y")]
    assert main(bad) == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_smollm2_pairs_short(smollm2):
    """SmolLM2, 2 x 128 tokens, 60 pairs: every layer analysed, pools decode to token strings."""
    model, tokenizer = smollm2
    ids = short_windows(tokenizer, "evaluation")
    result = analyze_pairs(model, ids, 60, 5, 3, seed=0, batch_size=2, progress=False)
    assert result.zscores.shape == (30, 30)
    assert torch.allclose(result.normalized.diagonal(), torch.ones(30, dtype=torch.float64))
    records = pair_records(result, 1, ids, tokenizer)
    assert len(records) == 15 and all(r.tokens[0] and r.tokens[1] for r in records)
    assert records[0].tokens[0] == tokenizer.convert_ids_to_tokens(
        int(ids.reshape(-1)[records[0].positions[0]])
    )
