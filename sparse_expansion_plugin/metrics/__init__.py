"""Per-neuron statistics on ``[tokens, neurons]`` tensors from any source (hooks, TransformerLens, nnsight)."""

from sparse_expansion_plugin.metrics.mapping import mapping_difficulty, oi_ratios, sample_token_pairs
from sparse_expansion_plugin.metrics.moments import StreamingMoments, excess_kurtosis, skewness
from sparse_expansion_plugin.metrics.wasserstein import StreamingWD, wd_exact, wd_to_gaussian

__all__ = [
    "StreamingMoments",
    "StreamingWD",
    "excess_kurtosis",
    "mapping_difficulty",
    "oi_ratios",
    "sample_token_pairs",
    "skewness",
    "wd_exact",
    "wd_to_gaussian",
]
