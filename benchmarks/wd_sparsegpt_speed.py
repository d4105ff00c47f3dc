"""Compression time of WD-aware SparseGPT as a ratio to stock SparseGPT, in one process.

Both run ``oneshot`` on SmolLM2 with the same calibration windows; runs
alternate (stock, WD, stock, WD, ...) so drift in machine load hits both.
Peak memory is the peak resident set size above the level before each run,
sampled every 20 ms.

    flock /tmp/heavy.lock python benchmarks/wd_sparsegpt_speed.py --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Context manager sampling this process's RSS; ``.peak_delta`` is the peak above the start level."""

    def __enter__(self) -> PeakRSS:
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_delta = self.peak - self.start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--allocation", default="rows", choices=["rows", "layers", "both"])
    parser.add_argument("--score", default="wd")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    from sparse_expansion_plugin.compression import run_oneshot
    from sparse_expansion_plugin.data import load_model_and_tokenizer
    from sparse_expansion_plugin.data.calibration import calibration_dataset
    from sparse_expansion_plugin.wd_sparsegpt.modifier import WassersteinSparseGPTModifier

    torch.set_num_threads(args.threads)
    _, tokenizer = load_model_and_tokenizer()
    calibration = calibration_dataset(tokenizer, args.num_calibration_samples, args.seq_len)
    common = {"sparsity": args.sparsity, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    makers = {
        "stock": lambda: SparseGPTModifier(**common),
        "wd": lambda: WassersteinSparseGPTModifier(**common, allocation=args.allocation, score=args.score),
    }
    times: dict[str, list[float]] = {k: [] for k in makers}
    peaks: dict[str, list[int]] = {k: [] for k in makers}
    for repeat in range(args.repeats):
        for kind, make in makers.items():
            model, _ = load_model_and_tokenizer()
            with PeakRSS() as rss:
                seconds = run_oneshot(
                    model,
                    tokenizer,
                    [make()],
                    args.num_calibration_samples,
                    args.seq_len,
                    seed=None,  # never seeded here; the runs time the solver, not its results
                    dataset=calibration,
                )
            times[kind].append(seconds)
            peaks[kind].append(rss.peak_delta)
            print(
                f"run {repeat} {kind:5s}: {seconds:7.1f} s, peak RSS +{rss.peak_delta / 2**30:.2f} GiB",
                flush=True,
            )
            del model
    stock, wd = statistics.median(times["stock"]), statistics.median(times["wd"])
    print(
        f"\nSmolLM2-135M, {args.num_calibration_samples}x{args.seq_len} calibration tokens, sparsity {args.sparsity}, "
        f"WD-aware allocation={args.allocation} score={args.score}, {args.threads} threads"
    )
    print(f"stock SparseGPT     {stock:7.1f} s  peak +{max(peaks['stock']) / 2**30:.2f} GiB")
    print(f"WD-aware SparseGPT  {wd:7.1f} s  peak +{max(peaks['wd']) / 2**30:.2f} GiB")
    print(f"time ratio WD-aware / stock: {wd / stock:.2f}x (goal <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
