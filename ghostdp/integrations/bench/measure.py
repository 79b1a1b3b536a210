"""Peak memory and step time of one (case, engine), in a fresh process; the largest batch within a budget.

Memory is measured in a fresh process per (case, engine) (:func:`measure_in_subprocess`), as the peak over
two training steps of everything the process holds, weights and optimizer state included:

- CUDA: ``torch.cuda.max_memory_allocated()`` (peak reset after setup, so model loading does not count).
- CPU: peak RSS (``VmHWM``, reset after setup through ``/proc/self/clear_refs``) minus the RSS the process
  had after importing torch, transformers, peft, opacus and ghostdp and running a throwaway miniature
  step (identical for every engine), so the ratios are not diluted by libraries and first-use buffers.
  The process runs with glibc's mmap threshold fixed at 64 KiB, so a freed tensor leaves RSS and the
  peak follows what was alive rather than how the heap fragmented.

Step times in a record are seconds per optimizer step (forward, per-example loss, backward,
``optimizer.step()``, ``zero_grad``; synchronised on CUDA), wall clock and process CPU time.

The largest batch that fits a memory budget is a doubling-then-bisection search over batch sizes
(:func:`search_max`), one fresh process per try; on CUDA the budget is enforced with
``torch.cuda.set_per_process_memory_fraction``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ghostdp.integrations.bench.workloads import Case, setup

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 3600


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _warm_up_libraries() -> None:
    """Run a throwaway miniature training step (linear, embedding, attention, cross-entropy, AdamW), so
    that the buffers torch's CPU kernels allocate on first use are in the baseline, not in a figure."""
    import torch
    import torch.nn.functional as F

    emb, lin = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64)
    opt = torch.optim.AdamW([*emb.parameters(), *lin.parameters()])
    ids = torch.randint(0, 64, (2, 8))
    h = emb(ids).view(2, 8, 2, 16).transpose(1, 2)  # (B, heads, T, d)
    h = F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(2, 8, 32)
    F.cross_entropy(lin(h).flatten(0, 1), ids.flatten()).backward()
    opt.step()


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak covers the steps only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _import_libraries() -> None:
    """Every child imports the same libraries before its baseline RSS is read, whichever engine it runs."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers

    import ghostdp.engine.privacy_engine  # noqa: F401

    try:
        import opacus  # noqa: F401
    except ImportError:
        pass
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text


def _failure_status(exc: BaseException) -> str:
    """"oom", "unsupported: ..." (the engine refuses the model) or "error: ..." (a bug somewhere)."""
    from ghostdp.engine.errors import UnsupportedModuleError

    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if _is_oom(exc):
        return "oom"
    if isinstance(exc, NotImplementedError | UnsupportedModuleError):
        return f"unsupported: {type(exc).__name__}: {first}"
    return f"error: {type(exc).__name__}: {first}"


def measure(case: Case, engine: str, *, steps: int, warmup: int, weights_dir: str | None = None,
            memory_budget: int | None = None, isolated: bool = False, seed: int = 0) -> dict:
    """Set up ``case`` with ``engine`` in this process and run ``warmup + steps`` steps.

    Returns a record: status, the timed step durations, the peak memory over all steps (see the module
    docstring for its definition) and the number of trainable elements. Memory is only meaningful in a
    fresh process (``isolated=True``, which :func:`measure_in_subprocess` sets); in-process records say so.
    """
    import torch

    cuda = case.device.startswith("cuda")
    if isolated and not cuda:
        _warm_up_libraries()
    record: dict[str, Any] = {"case": case.id, "engine": engine, "isolated": isolated, "step_times": [],
                              "cpu_times": [], "peak_bytes": None, "setup_bytes": None, "trainable": None}
    base_rss = _proc_status_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if memory_budget is not None:
            total = torch.cuda.get_device_properties(torch.device(case.device)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_budget / total), torch.device(case.device))
    workload = None
    try:
        workload = setup(case, engine, weights_dir=weights_dir, seed=seed)
        record["trainable"] = workload.trainable
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            record["setup_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            record["memory_kind"] = "cuda max_memory_allocated"
        else:
            rss = _proc_status_bytes("VmRSS")
            record["setup_bytes"] = None if rss is None or base_rss is None else rss - base_rss
            threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            record["memory_kind"] = ("peak RSS above baseline" + ("" if _reset_peak_rss() else " (process lifetime)")
                                     + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""))
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            workload.step()
            if i >= warmup:
                record["step_times"].append(time.perf_counter() - t0)
                record["cpu_times"].append(time.process_time() - c0)
        if cuda:
            record["peak_bytes"] = torch.cuda.max_memory_allocated()
        elif isolated:
            hwm = _proc_status_bytes("VmHWM")
            record["peak_bytes"] = None if hwm is None or base_rss is None else hwm - base_rss
        else:  # RSS in a process that ran other engines before says nothing about this one
            record["setup_bytes"], record["memory_kind"] = None, "not measured (in-process on CPU)"
        record["status"] = "ok"
        if memory_budget is not None and record["peak_bytes"] is not None and record["peak_bytes"] > memory_budget:
            record["status"] = "oom"
    except Exception as exc:  # noqa: BLE001 - any failure becomes a row of the table, never a crash
        record["status"] = _failure_status(exc)
        if record["status"].startswith("error"):
            log.warning("%s on %s failed", engine, case.id, exc_info=True)
        else:
            log.info("%s on %s: %s", engine, case.id, record["status"])
    finally:
        del workload
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def measure_in_subprocess(case: Case, engine: str, *, steps: int, warmup: int, weights_dir: str | None = None,
                          memory_budget: int | None = None, seed: int = 0, threads: int | None = None,
                          timeout: float = CHILD_TIMEOUT_S) -> dict:
    """:func:`measure` in a fresh process, so its peak memory is its own.

    The process is forked from a server that imported the libraries once (:class:`_ForkServer`): a fresh
    address space per measurement without paying ~10 s of imports each time. Where ``os.fork`` does not
    exist, a new interpreter is started instead.
    """
    with tempfile.TemporaryDirectory(prefix="ghostdp-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        payload = {"case": dataclasses.asdict(case), "engine": engine, "steps": steps, "warmup": warmup,
                   "weights_dir": weights_dir, "memory_budget": memory_budget, "seed": seed,
                   "threads": threads, "result_path": str(result_path)}
        if hasattr(os, "fork"):
            code = _fork_server().run(payload, timeout)
        else:  # pragma: no cover - no fork (Windows)
            cmd = [sys.executable, "-c", "from ghostdp.integrations.bench.measure import _child_main; _child_main()",
                   json.dumps(payload)]
            try:
                code = subprocess.run(cmd, env=_child_env(), timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
        if result_path.exists():
            return json.loads(result_path.read_text())
    log.warning("bench child for %s on %s ended with exit code %s (its stderr is above)", engine, case.id, code)
    if code is None:
        return _failed_record(case, engine, f"error: timed out after {timeout:.0f} s")
    if code == -signal.SIGKILL:
        return _failed_record(case, engine, "oom: child killed (SIGKILL), host memory likely exhausted")
    return _failed_record(case, engine, f"error: child exited with code {code}")


def _failed_record(case: Case, engine: str, status: str) -> dict:
    return {"case": case.id, "engine": engine, "isolated": True, "step_times": [], "cpu_times": [],
            "peak_bytes": None, "setup_bytes": None, "trainable": None, "status": status}


def _child_env() -> dict:
    """Environment of measured processes. glibc keeps freed blocks below its (self-raising, up to 32 MiB)
    mmap threshold in its heap, so RSS would record how the allocator happened to fragment rather than
    what was alive; a fixed 64 KiB threshold hands every tensor-sized block back to the OS on free."""
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def _run_payload(payload: dict) -> None:
    """In the fresh process: one :func:`measure`, its record written to ``payload["result_path"]``."""
    if payload.get("threads"):
        import torch

        torch.set_num_threads(payload["threads"])
    record = measure(Case(**payload["case"]), payload["engine"], steps=payload["steps"],
                     warmup=payload["warmup"], weights_dir=payload["weights_dir"],
                     memory_budget=payload["memory_budget"], isolated=True, seed=payload["seed"])
    Path(payload["result_path"]).write_text(json.dumps(record))


def _child_main() -> None:  # pragma: no cover - the no-fork fallback
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _import_libraries()
    _run_payload(json.loads(sys.argv[1]))


class _ForkServer:
    """A Python process that imports torch, transformers, peft, opacus and ghostdp once, then forks one
    child per measurement (payload as a JSON line on its stdin; it answers the child's pid, then its exit
    code). The server itself never runs a torch op or touches CUDA, so forking it is safe, and every child
    starts from the same baseline."""

    def __init__(self):
        code = "from ghostdp.integrations.bench.measure import _fork_server_main; _fork_server_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_child_env())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float | None) -> dict | None:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, payload: dict, timeout: float) -> int | None:
        """Exit code of the child (negative: killed by that signal), or None if it timed out."""
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        started = self._read(None)
        if started is None:
            raise RuntimeError("the benchmark fork server died; see its stderr above")
        done = self._read(timeout)
        if done is None:
            os.kill(started["pid"], signal.SIGKILL)
            self._read(None)
            return None
        return done["exit"]

    def close(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_SERVER: _ForkServer | None = None


def _fork_server() -> _ForkServer:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        import atexit

        _SERVER = _ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def _fork_server_main() -> None:
    """The server loop (see :class:`_ForkServer`). Children send their stdout to stderr: stdout is the
    protocol channel."""
    import traceback

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _import_libraries()
    channel = sys.stdout
    for line in sys.stdin:
        payload = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(2, 1)
                _run_payload(payload)
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        channel.write(json.dumps({"pid": pid}) + "\n")
        channel.flush()
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        channel.flush()


def search_max(fits: Callable[[int], bool], *, start: int = 1, limit: int = 4096) -> int | None:
    """Largest ``b`` in [start, limit] with ``fits(b)``, assuming fits is monotone (True then False).

    Doubling from ``start`` until the first failure, then bisection between the last success and it:
    about 2·log2(answer) calls. None when ``start`` itself does not fit.
    """
    if not fits(start):
        return None
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def predict_max_batch(peaks: dict[int, int], budget_bytes: int) -> int | None:
    """Largest batch size whose peak memory stays within ``budget_bytes``, predicted from peaks measured at two
    or more batch sizes (``{batch size: peak bytes}``) by the least-squares line ``peak(B) = fixed + B * per_example``.

    A training step's peak is affine in B: weights, gradients and optimizer state do not depend on it,
    activations (and per-example gradients) grow with it. Two fresh processes at small B then replace the
    ~2·log2(answer) processes of :func:`max_batch_size`, each at up to the largest batch; a caller with time
    to spare confirms the prediction with one run at that size. None when the smallest measured batch
    does not fit or the peaks do not grow with B (the line says nothing then).
    """
    if len(peaks) < 2:
        raise ValueError(f"need peaks at two or more batch sizes to fit a line, got {sorted(peaks)}")
    bs = sorted(peaks)
    if peaks[bs[0]] > budget_bytes:
        return None
    mean_b = sum(bs) / len(bs)
    mean_p = sum(peaks[b] for b in bs) / len(bs)
    slope = sum((b - mean_b) * (peaks[b] - mean_p) for b in bs) / sum((b - mean_b) ** 2 for b in bs)
    if slope <= 0:
        return None
    fixed = mean_p - slope * mean_b
    return max(bs[0], int((budget_bytes - fixed) // slope))


def max_batch_size(case: Case, engine: str, budget_bytes: int, *, weights_dir: str | None = None,
                   limit: int = 4096) -> int | None:
    """Largest batch size of ``case`` whose step peak memory stays within ``budget_bytes`` (fresh process
    per try; one warm-up and one timed step, so the optimizer state is allocated)."""

    def fits(b: int) -> bool:
        rec = measure_in_subprocess(dataclasses.replace(case, batch_size=b), engine, steps=1, warmup=1,
                                    weights_dir=weights_dir, memory_budget=budget_bytes)
        ok = rec["status"] == "ok"
        log.info("max batch %s %s B=%d: %s", case.id, engine, b, rec["status"])
        if not ok and rec["status"] != "oom":
            raise RuntimeError(f"{engine} on {case.id} at batch size {b}: {rec['status']}")
        return ok

    try:
        return search_max(fits, limit=limit)
    except RuntimeError as exc:
        log.warning("largest-batch search stopped: %s", exc)
        return None
