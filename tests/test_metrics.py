"""Metrics against independent references: scipy, numerical quadrature, slow loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats as st
import torch

from sparse_expansion_plugin.metrics import (
    StreamingMoments,
    StreamingWD,
    excess_kurtosis,
    mapping_difficulty,
    oi_ratios,
    sample_token_pairs,
    skewness,
    wd_exact,
    wd_to_gaussian,
)


def _bimodal() -> st.rv_continuous:
    class Bimodal(st.rv_continuous):
        """0.3 N(-2, 0.5^2) + 0.7 N(1, 1)."""

        def _cdf(self, x):
            return 0.3 * st.norm.cdf(x, -2, 0.5) + 0.7 * st.norm.cdf(x, 1, 1)

        def _pdf(self, x):
            return 0.3 * st.norm.pdf(x, -2, 0.5) + 0.7 * st.norm.pdf(x, 1, 1)

    return Bimodal(name="bimodal")


LAWS = {
    "uniform": st.uniform(loc=-1, scale=2),
    "laplace": st.laplace(),
    "bimodal": _bimodal()(),
}


def _quadrature_wd(law) -> float:
    """W1 between the standardised law and N(0,1) as the integral of |F - Phi|."""
    mean, std = law.mean(), law.std()

    def gap(t: float) -> float:
        return abs(law.cdf(mean + std * t) - st.norm.cdf(t))

    return sum(
        scipy.integrate.quad(gap, a, b, limit=400)[0] for a, b in [(-40, -3), (-3, 0), (0, 3), (3, 40)]
    )


@pytest.mark.parametrize("name", sorted(LAWS))
def test_exact_wd_matches_quadrature_for_known_laws(name):
    law = LAWS[name]
    n = 200_000
    # A deterministic "sample": the law's quantiles at midpoints, so the error is O(1/n), not O(1/sqrt n).
    u = (np.arange(n) + 0.5) / n
    if name == "bimodal":  # no closed-form ppf: invert the cdf on a fine grid
        t = np.linspace(-8, 8, 400_001)
        grid = np.interp(u, law.cdf(t), t)
    else:
        grid = law.ppf(u)
    got = wd_exact(torch.from_numpy(grid)[:, None]).item()
    assert got == pytest.approx(_quadrature_wd(law), abs=1e-3)


def test_exact_wd_matches_scipy_against_large_normal_sample():
    torch.manual_seed(0)
    outputs = torch.stack(
        [torch.randn(5000), torch.rand(5000) * 3 + 1, torch.distributions.Exponential(1.0).sample((5000,))],
        dim=1,
    ).double()
    reference_normal = np.random.default_rng(0).standard_normal(4_000_000)
    got = wd_exact(outputs)
    for j in range(outputs.shape[1]):
        col = outputs[:, j].numpy()
        standardised = (col - col.mean()) / col.std()
        expected = st.wasserstein_distance(standardised, reference_normal)
        # The reference normal sample itself is off by ~1/sqrt(4e6) in W1.
        assert got[j].item() == pytest.approx(expected, abs=2e-3)


def test_exact_wd_is_scale_and_shift_invariant_and_deterministic():
    torch.manual_seed(1)
    x = torch.distributions.Gamma(2.0, 1.0).sample((3000, 4)).double()
    a = wd_exact(x)
    b = wd_exact(5.0 * x - 3.0)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(a, wd_exact(x))


def test_constant_neuron_is_point_mass_at_zero():
    x = torch.ones(100, 1)
    assert wd_exact(x).item() == pytest.approx(math.sqrt(2 / math.pi), abs=1e-6)


def test_streaming_wd_within_stated_bound_of_exact():
    torch.manual_seed(2)
    n = 30_000
    cols = [
        torch.randn(n),
        torch.rand(n),
        torch.distributions.Laplace(0.0, 1.0).sample((n,)),
        torch.cat([torch.randn(n // 2) - 4, torch.randn(n - n // 2) * 0.3 + 2]),
        torch.distributions.StudentT(2.0).sample((n,)),  # heavy tails hit the tail bins
        torch.distributions.Exponential(1.0).sample((n,)) * 100 + 7,
    ]
    x = torch.stack(cols, dim=1)
    acc = StreamingWD(x.shape[1], num_bins=512)
    for start in range(0, n, 1000):  # many small batches, provisional scale from the first only
        acc.update(x[start : start + 1000])
    exact = wd_exact(x.double())
    gap = (acc.wd() - exact).abs()
    assert (gap <= acc.error_bound() + 1e-9).all(), (gap, acc.error_bound())
    assert (acc.error_bound()[:4] < 0.02).all()


def test_wd_rejects_non_finite_and_unknown_method():
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        wd_to_gaussian(x)
    with pytest.raises(ValueError, match="unknown WD method"):
        wd_to_gaussian(torch.randn(10, 2), method="fast")


def test_moments_match_scipy_streaming_and_exact():
    torch.manual_seed(3)
    x = torch.distributions.Gamma(1.5, 2.0).sample((4000, 5)).double() + 1000.0  # large offset: cancellation
    acc = StreamingMoments(5)
    for start in range(0, 4000, 300):
        acc.update(x[start : start + 300])
    np.testing.assert_allclose(acc.skewness().numpy(), st.skew(x.numpy(), axis=0), rtol=1e-6)
    np.testing.assert_allclose(acc.excess_kurtosis().numpy(), st.kurtosis(x.numpy(), axis=0), rtol=1e-6)
    # Activations arrive in float32: the batch power sums are float32, accumulated in float64.
    acc32 = StreamingMoments(5)
    for start in range(0, 4000, 1000):
        acc32.update(x[start : start + 1000].float())
    np.testing.assert_allclose(acc32.skewness().numpy(), st.skew(x.numpy(), axis=0), rtol=1e-4)
    np.testing.assert_allclose(acc32.excess_kurtosis().numpy(), st.kurtosis(x.numpy(), axis=0), rtol=1e-4)
    np.testing.assert_allclose(skewness(x).numpy(), st.skew(x.numpy(), axis=0), rtol=1e-8)
    np.testing.assert_allclose(excess_kurtosis(x).numpy(), st.kurtosis(x.numpy(), axis=0), rtol=1e-8)
    np.testing.assert_allclose(acc.variance().numpy(), x.numpy().var(axis=0), rtol=1e-8)


def _slow_mapping_difficulty(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    dx = np.array([math.dist(x[i], x[j]) for i, j in pairs])
    out = []
    for n in range(y.shape[1]):
        dy = np.array([abs(y[i, n] - y[j, n]) for i, j in pairs])
        ratios = [(dy[p] / np.median(dy)) / (dx[p] / dx.max()) for p in range(len(pairs)) if dx[p] > 0]
        out.append(sum(ratios) / len(ratios))
    return np.array(out)


def test_mapping_difficulty_matches_slow_loop():
    torch.manual_seed(4)
    x = torch.randn(300, 8).double()
    x[7] = x[11]  # one duplicated input: pairs of identical inputs are skipped
    w = torch.randn(5, 8).double()
    y = torch.tanh(x @ w.T) * 3
    pairs = sample_token_pairs(300, 100, seed=9)
    assert len(set(pairs.view(-1).tolist())) == 200
    expected = _slow_mapping_difficulty(x.numpy(), y.numpy(), pairs.numpy())
    np.testing.assert_allclose(mapping_difficulty(x, y, 100, seed=9).numpy(), expected, rtol=1e-10)
    assert oi_ratios(x, y, pairs).shape == (100, 5)


def test_too_few_tokens_for_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="need 200 distinct tokens but only 150"):
        sample_token_pairs(150, 100)
