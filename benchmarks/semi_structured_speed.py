"""One 2:4-expanded linear on CUDA: semi-structured experts against packed, dense copies and the dense layer.

    python benchmarks/semi_structured_speed.py [--experts 16] [--tokens 16384]

SmolLM2-135M's MLP shapes (up: 576 -> 1536, down: 1536 -> 576), K experts of
random 2:4 weights, bfloat16, tokens routed unevenly (one expert a third, the
rest spread). Prints per storage the median time of one call (CUDA events),
for a prefill-sized call and for one token, as a ratio to ``nn.Linear`` with
the dense weight, and the bytes each storage holds. Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from sparse_expansion_plugin.sparse_expansion.layer import ExpandedLinear
from sparse_expansion_plugin.sparse_expansion.router import Routing

NO_CUDA = "no CUDA device: nothing to measure"
SHAPES = {"up_proj": (1536, 576), "down_proj": (576, 1536)}
MIB = 2**20


def cuda_ms(call: Callable[[], object], repeats: int = 20) -> float:
    """Median milliseconds of ``call`` by CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def two_four_experts(k: int, out: int, inp: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(k, out, inp // 4, 4, generator=gen)
    top_two = scores.topk(2, dim=-1).indices  # exactly 2 of every 4, ties or not
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_two, True).reshape(k, out, inp)
    return torch.randn(k, out, inp, generator=gen) * keep * 0.02, keep


def uneven_assignment(tokens: int, k: int, gen: torch.Generator) -> torch.Tensor:
    assignment = torch.randint(1, k, (tokens,), generator=gen)
    assignment[torch.rand(tokens, generator=gen) < 1 / 3] = 0
    return assignment


def measure(name: str, out: int, inp: int, experts: int, tokens: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    weights, keep = two_four_experts(experts, out, inp, gen)
    layer = ExpandedLinear.from_experts(weights.bfloat16(), keep=keep).cuda()
    dense = torch.nn.Linear(inp, out, bias=False, dtype=torch.bfloat16, device="cuda")
    dense_bytes = out * inp * 2
    rows = []
    for label, count in (("prefill", tokens), ("one token", 1)):
        x = torch.randn(count, inp, generator=gen).bfloat16().cuda()
        assignment = uneven_assignment(count, experts, gen).cuda()

        def routed(
            layer: ExpandedLinear = layer, x: torch.Tensor = x, assignment: torch.Tensor = assignment
        ) -> torch.Tensor:
            layer.block_routing = Routing.from_assignment(assignment, experts, source=x)
            try:
                return layer(x)
            finally:
                layer.block_routing = None

        with torch.no_grad():
            dense_ms = cuda_ms(lambda: dense(x))  # noqa: B023 (called before x changes)
            layer.materialize(False)
            layer.store_semi_structured(False)
            packed_ms = cuda_ms(routed)
            copies = layer.materialize(True)
            copies_ms = cuda_ms(routed)
            layer.materialize(False)
            semi = layer.store_semi_structured(True)
            semi_ms = cuda_ms(routed)
            layer.store_semi_structured(False)
        packed = layer.stored_bytes()
        for storage, ms, held in (
            ("packed (values + bitmask)", packed_ms, packed),
            ("dense expert copies", copies_ms, copies),
            ("semi-structured 2:4", semi_ms, semi),
        ):
            rows.append(
                f"| {name} {out}x{inp} | {label} ({count} tokens) | {storage} | {ms:.3f} | "
                f"{ms / dense_ms:.2f}x | {held / MIB:.1f} ({held / (experts * dense_bytes):.0%} of K dense) |"
            )
        rows.append(
            f"| {name} {out}x{inp} | {label} ({count} tokens) | dense nn.Linear | {dense_ms:.3f} | 1.00x | {dense_bytes / MIB:.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8 * 2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, K={args.experts}, bfloat16, "
        f"cuSPARSELt {torch.backends.cusparselt.is_available()}"
    )
    print("| linear | call | storage | ms | vs dense | MiB held |\n|---|---|---|---|---|---|")
    for name, (out, inp) in SHAPES.items():
        for row in measure(name, out, inp, args.experts, args.tokens):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
