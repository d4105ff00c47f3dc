"""One GPU check of Sparse Expansion: prefill, decode, compression time and lm-eval perplexity, one table.

    python benchmarks/gpu_check.py [--output gpu_check.json]

On a CUDA machine it takes under 6 minutes (a global time guard, ``--time-limit``, default 330 s,
stops whatever row is running and reports it) and prints one markdown table for the embedded
SmolLM2-135M:

- Sparse Expansion ``oneshot`` time (K=16, 50%, FFN linears) against stock SparseGPT on the same
  32x512 calibration windows, both run by llm-compressor on the GPU;
- forward time of 8x2048 tokens in bfloat16, dense against expanded with packed experts and with
  dense expert copies (``materialize_experts``), with packed / dense-expert bytes and the peak GPU
  memory next to them;
- greedy decoding of 64 tokens with ``generate`` (KV cache), tokens/s against dense;
- token perplexity of the expanded model (float32) through our lm-eval model and token task on
  CUDA against the same on CPU, relative difference (goal: within 1e-3).

Each row runs in its own ``try``: an error is printed in its row and the check goes on. The exit
code is 0 when every row ran, 1 when a row failed or was stopped by the time guard. Without CUDA
it prints "no CUDA device: nothing to check" and exits 0. ``--device cpu --quick`` (hidden) runs
the same code on CPU with tiny sizes: a dry run of every row, for testing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported by the tests
from _common import median_forward_seconds  # noqa: E402

NO_CUDA = "no CUDA device: nothing to check"
MLP_TARGETS = [r"re:.*mlp\.(gate|up|down)_proj$"]
TOKEN_TASK = "sparse_expansion_token_perplexity"
MIB = 2**20
logger = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Sizes:
    calibration_samples: int
    calibration_len: int
    experts: int
    prefill_batch: int
    prefill_len: int
    repeats: int
    decode_tokens: int
    prompt_len: int
    ppl_windows: int
    ppl_len: int


FULL = Sizes(32, 512, 16, 8, 2048, 3, 64, 32, 8, 512)
QUICK = Sizes(4, 32, 2, 2, 32, 1, 4, 8, 2, 32)  # --quick: every row, tiny sizes (a dry run)


@dataclass
class Row:
    """One line of the table; ``values`` holds the raw numbers for the JSON output."""

    check: str
    reference: str = ""
    measured: str = ""
    ratio: str = ""
    memory: str = ""
    goal: str = ""
    error: str | None = None
    seconds: float = 0.0
    values: dict[str, float] = field(default_factory=dict)


class TimeGuard(BaseException):
    """The global time guard fired. A ``BaseException`` so that no library's ``except Exception``
    (lm-eval's batch-size probe, accelerate's OOM retry) swallows it."""


@contextmanager
def alarm_at(deadline: float) -> Iterator[None]:
    """Raise :class:`TimeGuard` in the running code when ``time.monotonic()`` reaches ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeGuard

    def fire(signum: int, frame: Any) -> None:
        raise TimeGuard

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class GpuCheck:
    """The rows, the models they share, and the time guard around each."""

    def __init__(self, model_name: str, device: torch.device, sizes: Sizes, time_limit: float) -> None:
        self.model_name = model_name
        self.device = device
        self.sizes = sizes
        self.start = time.monotonic()
        self.deadline = self.start + time_limit
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.dense: Any = None
        self.tokenizer: Any = None
        self.expanded: Any = None
        self.expanded_dir: Path | None = None
        self.calibration: Any = None
        s = sizes
        self.rows = {
            "compress": Row(
                f"oneshot time, K={s.experts}, {s.calibration_samples}x{s.calibration_len} calibration tokens",
                goal="as a ratio to SparseGPT",
            ),
            "prefill_packed": Row(
                f"prefill {s.prefill_batch}x{s.prefill_len} bf16, packed experts", goal="<= 1.15x"
            ),
            "prefill_dense_experts": Row(
                f"prefill {s.prefill_batch}x{s.prefill_len} bf16, dense expert copies"
            ),
            "decode_packed": Row(
                f"decode {s.decode_tokens} greedy tokens (batch 1, KV cache), packed experts"
            ),
            "decode_dense_experts": Row(f"decode {s.decode_tokens} greedy tokens, dense expert copies"),
            "perplexity": Row(
                f"lm-eval token perplexity, expanded, float32, {s.ppl_windows}x{s.ppl_len}: CPU vs {device.type}",
                goal="<= 1e-3 relative",
            ),
        }

    # ------------------------------------------------------------------ running rows
    def run(self, key: str, body: Callable[[Row], None], needs_expanded: bool = True) -> None:
        """Run one row's ``body`` under the global time guard; record any error in the row."""
        row = self.rows[key]
        started = time.monotonic()
        try:
            if needs_expanded and self.expanded is None:
                raise RuntimeError("no expanded model (its oneshot failed or was stopped)")
            with alarm_at(self.deadline):
                body(row)
        except TimeGuard:
            row.error = f"stopped by the global time guard after {time.monotonic() - self.start:.0f} s"
        except Exception as error:  # a row's failure is reported in its row, not fatal to the check
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            row.error = f"{type(error).__name__}: {message}"[:300]
            logger.debug("row %s failed:\n%s", key, traceback.format_exc())
        finally:
            row.seconds = time.monotonic() - started
            reset_peak(self.device)

    def check(self) -> list[Row]:
        self.run("compress", self.compress_expanded, needs_expanded=False)
        self.run("prefill_packed", lambda row: self.prefill(row, dense_experts=False))
        self.run("prefill_dense_experts", lambda row: self.prefill(row, dense_experts=True))
        self.run("decode_packed", lambda row: self.decode(row, dense_experts=False))
        self.run("decode_dense_experts", lambda row: self.decode(row, dense_experts=True))
        self.run("perplexity", self.perplexity)
        # Last: stock SparseGPT's time, the reference of the first row, with whatever time is left.
        if self.rows["compress"].error is None:
            self.run("compress", self.compress_stock, needs_expanded=False)
        return list(self.rows.values())

    # ------------------------------------------------------------------ rows
    def _load(self) -> tuple[Any, Any]:
        from sparse_expansion_plugin.data.models import load_model_and_tokenizer

        return load_model_and_tokenizer(self.model_name)

    def _oneshot(self, recipe: list[Any]) -> tuple[Any, float]:
        from compressed_tensors.offload import remove_dispatch

        from sparse_expansion_plugin.compression import run_oneshot
        from sparse_expansion_plugin.data.calibration import calibration_dataset

        model, tokenizer = self._load()
        s = self.sizes
        if self.calibration is None:
            self.calibration = calibration_dataset(tokenizer, s.calibration_samples, s.calibration_len)
        seconds = run_oneshot(
            model, tokenizer, recipe, s.calibration_samples, s.calibration_len, dataset=self.calibration
        )
        # The sequential pipeline leaves the model offloaded to the CPU (compressed-tensors' cache)
        # with onloading to the GPU; take it back to plain tensors before moving it ourselves.
        remove_dispatch(model)
        return model, seconds

    def compress_expanded(self, row: Row) -> None:
        from sparse_expansion_plugin.sparse_expansion.model import save_expanded
        from sparse_expansion_plugin.sparse_expansion.modifier import SparseExpansionModifier

        modifier = SparseExpansionModifier(num_experts=self.sizes.experts, sparsity=0.5, seed=0)
        model, seconds = self._oneshot([modifier])
        row.values["sparse_expansion_s"] = seconds
        row.measured = f"Sparse Expansion {seconds:.1f} s"
        row.reference = "SparseGPT: not run (time guard)"
        self.expanded = model.eval()
        self.dense, self.tokenizer = self._load()
        self.expanded_dir = save_expanded(self.expanded, self.tokenizer, self.workdir / "expanded")

    def compress_stock(self, row: Row) -> None:
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        _, seconds = self._oneshot([SparseGPTModifier(sparsity=0.5, targets=MLP_TARGETS)])
        row.values["sparsegpt_s"] = seconds
        row.reference = f"SparseGPT {seconds:.1f} s"
        row.ratio = f"{row.values['sparse_expansion_s'] / seconds:.2f}x"

    def _on_device_bf16(self) -> None:
        """Dense and expanded models on the checked device in bfloat16 (once)."""
        for model in (self.dense, self.expanded):
            if (
                next(model.parameters()).dtype != torch.bfloat16
                or next(model.parameters()).device != self.device
            ):
                model.to(device=self.device, dtype=torch.bfloat16)

    def prefill(self, row: Row, dense_experts: bool) -> None:
        from sparse_expansion_plugin.data.text import token_windows
        from sparse_expansion_plugin.sparse_expansion.cost import expansion_cost
        from sparse_expansion_plugin.sparse_expansion.layer import materialize_experts

        self._on_device_bf16()
        s = self.sizes
        ids = token_windows(self.tokenizer, "evaluation", s.prefill_len, s.prefill_batch).to(self.device)
        extra = materialize_experts(self.expanded, enable=dense_experts)
        reset_peak(self.device)
        dense_s = median_forward_seconds(self.dense, ids, s.repeats)
        dense_peak = peak_gpu_gib(self.device)
        reset_peak(self.device)
        expanded_s = median_forward_seconds(self.expanded, ids, s.repeats)
        expanded_peak = peak_gpu_gib(self.device)
        cost = expansion_cost(self.expanded)
        row.values.update(dense_s=dense_s, expanded_s=expanded_s, ratio=expanded_s / dense_s)
        row.reference = f"dense {dense_s * 1e3:.1f} ms"
        row.measured = f"expanded {expanded_s * 1e3:.1f} ms"
        row.ratio = f"{expanded_s / dense_s:.2f}x"
        if dense_experts:
            row.values["dense_expert_bytes"] = extra
            row.memory = f"+{extra / MIB:.0f} MiB dense expert copies"
        else:
            row.values.update(packed_bytes=cost.expanded_bytes, dense_ffn_bytes=cost.dense_bytes)
            row.memory = (
                f"packed experts {cost.expanded_bytes / MIB:.0f} MiB "
                f"({cost.expanded_bytes / cost.dense_bytes:.1f}x the dense FFN's {cost.dense_bytes / MIB:.0f} MiB)"
            )
        if expanded_peak is not None and dense_peak is not None:
            row.values.update(dense_peak_gib=dense_peak, expanded_peak_gib=expanded_peak)
            row.memory += f"; peak GPU {expanded_peak:.2f} GiB (dense {dense_peak:.2f})"

    def _decode_seconds(self, model: Any, prompt: torch.Tensor) -> float:
        """Median wall time of greedy decoding ``decode_tokens`` tokens (exactly that many) after ``prompt``."""
        tokens = self.sizes.decode_tokens
        kwargs = dict(do_sample=False, use_cache=True, pad_token_id=self.tokenizer.eos_token_id)
        attention = torch.ones_like(prompt)
        with torch.no_grad():
            model.generate(prompt, attention_mask=attention, max_new_tokens=2, min_new_tokens=2, **kwargs)
            times = []
            for _ in range(self.sizes.repeats):
                synchronize(self.device)
                start = time.perf_counter()
                out = model.generate(
                    prompt, attention_mask=attention, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs
                )
                synchronize(self.device)
                times.append(time.perf_counter() - start)
        if out.shape[1] != prompt.shape[1] + tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} tokens, not {tokens}")
        return statistics.median(times)

    def decode(self, row: Row, dense_experts: bool) -> None:
        from sparse_expansion_plugin.data.text import token_windows
        from sparse_expansion_plugin.sparse_expansion.layer import materialize_experts

        self._on_device_bf16()
        materialize_experts(self.expanded, enable=dense_experts)
        prompt = token_windows(self.tokenizer, "evaluation", self.sizes.prompt_len, 1).to(self.device)
        dense_s = self._decode_seconds(self.dense, prompt)
        expanded_s = self._decode_seconds(self.expanded, prompt)
        tokens = self.sizes.decode_tokens
        row.values.update(
            dense_tokens_per_s=tokens / dense_s,
            expanded_tokens_per_s=tokens / expanded_s,
            ratio=expanded_s / dense_s,
        )
        row.reference = f"dense {tokens / dense_s:.1f} tokens/s"
        row.measured = f"expanded {tokens / expanded_s:.1f} tokens/s"
        row.ratio = f"{expanded_s / dense_s:.2f}x the time"
        if dense_experts:
            materialize_experts(self.expanded, enable=False)  # back to packed for whatever follows

    def _lm_eval_perplexity(self, device: torch.device) -> float:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from sparse_expansion_plugin.evaluation.lm_eval_cli import TASKS_DIR
        from sparse_expansion_plugin.evaluation.lm_eval_model import SparseExpansionLM

        s = self.sizes
        metadata = {"pretrained": str(self.expanded_dir), "seq_len": s.ppl_len, "num_windows": s.ppl_windows}
        lm = SparseExpansionLM(
            pretrained=str(self.expanded_dir), device=str(device), dtype="float32", batch_size=4
        )
        task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[TOKEN_TASK], task_manager=task_manager, metadata=metadata, verbosity="WARNING"
        )
        return float(out["results"][TOKEN_TASK]["token_perplexity,none"])

    def perplexity(self, row: Row) -> None:
        # Free the bf16 copies first: the lm-eval model loads its own float32 copy from the saved directory.
        self.dense = None
        self.expanded = self.expanded.to("cpu")
        reset_peak(self.device)
        on_device = self._lm_eval_perplexity(self.device)
        on_cpu = self._lm_eval_perplexity(torch.device("cpu"))
        relative = abs(on_device - on_cpu) / on_cpu
        row.values.update(cpu=on_cpu, device=on_device, relative_difference=relative)
        row.reference = f"CPU {on_cpu:.4f}"
        row.measured = f"{self.device.type} {on_device:.4f}"
        row.ratio = f"{relative:.1e} relative"


def markdown_table(rows: list[Row]) -> str:
    head = "| check | reference | measured | ratio / difference | memory | goal |\n|---|---|---|---|---|---|"
    lines = [head]
    for row in rows:
        if row.error is not None and not row.reference and not row.measured:
            lines.append(f"| {row.check} | **error** | {row.error} | | | {row.goal} |")
            continue
        measured = row.measured if row.error is None else f"{row.measured} (**error**: {row.error})"
        lines.append(
            f"| {row.check} | {row.reference} | {measured} | {row.ratio} | {row.memory} | {row.goal} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded default, a saved dir or a hub name")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--time-limit", type=float, default=330.0, help="global time guard, seconds")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: dry run of the rows
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tiny sizes
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    logging.basicConfig(level=logging.WARNING)
    sizes = QUICK if args.quick else FULL
    check = GpuCheck(args.model, device, sizes, args.time_limit)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    try:
        rows = check.check()
    finally:
        shutil.rmtree(check.workdir, ignore_errors=True)  # the saved expanded model
    total = time.monotonic() - check.start
    print(f"\nSparse Expansion GPU check: {args.model} on {name}, torch {torch.__version__}, {total:.0f} s")
    print(markdown_table(rows))
    if args.output is not None:
        from sparse_expansion_plugin.outputs import atomic_write_text

        report = {
            "model": args.model,
            "device": name,
            "torch": torch.__version__,
            "total_s": total,
            "time_limit_s": args.time_limit,
            "sizes": asdict(sizes),
            "rows": [asdict(row) for row in rows],
        }
        atomic_write_text(args.output, json.dumps(report, indent=1))
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
