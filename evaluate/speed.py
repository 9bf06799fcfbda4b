"""``quantcal bench MODEL.onnx``: what an exported model buys in speed and memory.

Prefill tokens/s (a prompt of ``prompt_len`` tokens, logits left on the device), decode
tokens/s (``new_tokens`` greedy steps after a short prompt, the cache on the device and
only the next token's logits copied back, as generation does), peak device memory (NVML,
sampled while the benchmark runs, when available) and the size on disk; optionally the same
for a baseline export side by side.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np

from quantcal.errors import QuantcalError
from quantcal.export.positions import check_fits
from quantcal.graphrunner import decoding_runner
from quantcal.provenance import verified_export


class _PeakMemory:
    """Samples the GPU's used memory (NVML) in a thread; ``peak`` in bytes, or None."""

    def __init__(self, device_id: int = 0, period_s: float = 0.005):
        self.peak: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # no NVML (CPU machine): memory is not measured
            self._read = None
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)

    def _loop(self, period_s: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak or 0, int(self._read()))
            time.sleep(period_s)

    def __enter__(self) -> "_PeakMemory":
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join()


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


DECODE_PROMPT = 16  # tokens prefilled before the timed decode steps


def _check_sizes(path: Path, batch: int, prompt_len: int, new_tokens: int) -> None:
    """One line, before any session opens, for sizes the model cannot take."""
    for flag, value in (("--batch-size", batch), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens)):
        if value < 1:
            raise QuantcalError(f"{flag} must be at least 1, got {value}")
    check_fits(path, prompt_len, f"--prompt-len {prompt_len}",
               lambda limit: f"pass --prompt-len {limit} or less")
    short = min(DECODE_PROMPT, prompt_len)
    check_fits(path, short + new_tokens,
               f"--new-tokens {new_tokens} (after a {short}-token prompt)",
               lambda limit: f"pass --new-tokens {limit - short} or less")


def bench_model(path: Path, *, provider: str = "auto", batch: int = 1, prompt_len: int = 1024,
                new_tokens: int = 128, repeats: int = 3) -> dict[str, float | str]:
    """Prefill and decode throughput, peak memory and size of one exported model."""
    path = Path(path)
    verified_export(path)
    _check_sizes(path, batch, prompt_len, new_tokens)
    runner = decoding_runner(path, provider)  # CUDA graphs for decoding where they apply
    used = runner.provider
    rng = np.random.default_rng(0)
    vocab = runner.spec.vocab_size or 1000
    prompt = rng.integers(0, vocab, (batch, prompt_len), dtype=np.int64)
    short = prompt[:, :DECODE_PROMPT]

    def prefill() -> None:
        runner.prefill(prompt, host_logits=False, last_logits=True,
                       cache_length=prompt_len if runner.shares_cache else None)

    cache = short.shape[1] + new_tokens if runner.shares_cache else None

    def start():
        return runner.prefill(short, host_logits=False, cache_length=cache, last_logits=True)

    def decode() -> None:  # as generation runs: cache in place, only token ids to the host
        for _ in runner.greedy(start(), new_tokens + 1):  # new_tokens model steps
            pass

    with _PeakMemory() as memory:
        prefill()  # warm-up: kernels, arena
        decode()
        gc.disable()  # a collection inside a timed loop is noise, not the model's speed
        try:
            t_prefill = _best(prefill, repeats)
            t_start = _best(start, repeats)
            t_decode = _best(decode, repeats) - t_start
        finally:
            gc.enable()
    files = [path, path.with_name(path.name + ".data")]
    return {"model": str(path), "provider": used, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "prefill_tok_s": batch * prompt_len / t_prefill,
            "decode_tok_s": batch * new_tokens / max(t_decode, 1e-9),
            "peak_memory_mb": None if memory.peak is None else memory.peak / 1e6,
            "file_mb": sum(p.stat().st_size for p in files if p.exists()) / 1e6}


def format_model_bench(rows: list[dict]) -> str:
    head = (f"{'model':40} {'provider':8} {'batch':>5} {'prefill tok/s':>14} "
            f"{'decode tok/s':>13} {'peak MB':>9} {'file MB':>9}")
    lines = [head]
    for r in rows:
        mem = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"{Path(r['model']).parent.name + '/' + Path(r['model']).name:40.40} "
                     f"{r['provider']:8} {r['batch']:>5} {r['prefill_tok_s']:14,.0f} "
                     f"{r['decode_tok_s']:13,.1f} {mem:>9} {r['file_mb']:9.1f}")
    return "\n".join(lines)
