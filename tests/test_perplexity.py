"""``window_nlls`` / ``token_perplexity`` against a float64 reference computed the obvious way."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sparse_expansion_plugin.evaluation.perplexity import _rowwise_nll_float64, token_perplexity, window_nlls


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a fixed function of the token ids (large vocabulary, like SmolLM2's)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(
            0.07 * torch.randn(vocab, vocab // 64, generator=gen), requires_grad=False
        )
        self.proj = torch.nn.Parameter(torch.randn(vocab // 64, vocab, generator=gen), requires_grad=False)

        # one confident class per position, as a trained LM: then the vocabulary's many small
        # exp() terms are what a careless float32 sum drops
        self.peak = torch.randint(0, vocab, (vocab,), generator=gen)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = self.table[input_ids] @ self.proj
        logits.scatter_add_(-1, self.peak[input_ids][..., None], torch.full((*input_ids.shape, 1), 18.0))
        return SimpleNamespace(logits=logits)


def reference_nlls(model: FixedLogits, windows: torch.Tensor) -> torch.Tensor:
    """Per-window summed NLL with log-softmax in float64, one prediction at a time."""
    out = []
    for window in windows:
        logits = model(window[None]).logits[0].double()
        total = 0.0
        for position in range(len(window) - 1):
            row = logits[position]
            total += float(torch.logsumexp(row, 0) - row[window[position + 1]])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_window_nlls_match_float64_reference(batch_size):
    vocab = 49152
    model = FixedLogits(vocab)
    windows = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(1))
    expected = reference_nlls(model, windows)
    ours = window_nlls(model, windows, batch_size=batch_size, progress=False)
    # the same float32 logits, log-softmax in float64 both ways: only summation order differs. A
    # float32 log-softmax erred by 2e-5 nats per token on an AVX2 CPU (1.5e-4 over a strided vocabulary)
    torch.testing.assert_close(ours, expected, rtol=0, atol=32 * 1e-9)
    ppl = token_perplexity(model, windows, batch_size=batch_size, progress=False)
    assert ppl == pytest.approx(math.exp(expected.sum().item() / (4 * 32)), rel=1e-5)


def test_windows_shape_is_checked():
    with pytest.raises(ValueError, match="windows must be"):
        window_nlls(FixedLogits(128), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 512])
def test_chunked_float64_nll_matches_an_obvious_logsumexp(rows_per_chunk):
    """Chunk boundaries that do and do not divide the rows give every row its own target's NLL."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 1000, generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 1000, (30,), generator=gen)
    expected = torch.tensor(
        [
            math.log(sum(math.exp(v) for v in row.double().tolist())) - row[t].item()
            for row, t in zip(logits, targets, strict=True)
        ],
        dtype=torch.float64,
    )
    ours = _rowwise_nll_float64(logits, targets, rows_per_chunk=rows_per_chunk)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
