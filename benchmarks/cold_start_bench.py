"""Cold start of one expert function, and what the in-process path holds against its weights' bytes.

Usage: python benchmarks/cold_start_bench.py [--runs 5] [--threads 2] [--memory-layers 1] [--work-dir DIR]

Model: the qwen1.5-bench preset (Qwen1.5-MoE-A2.7B's per-layer shapes, an 8192-token vocabulary) with 1
layer, exported with 20 experts per function; its first function (experts 0-19 of layer 0, 346 MB of
bf16, shard format 2) is started with the plan's sha256, as a deployment starts it.

(a) Replicas forked from the zygote (the embedded gateway's default), shard in the page cache. The first
    start after the zygote started hashes the shard; the later ones find its digest (the file is
    unchanged) and only map it. Phases from the replica's /stats, in ms after the fork: python (the
    replica runs), settings, imports, shard_verified, weights_loaded, listening; ready = the later of
    weights_loaded and listening (what /ready waits for). Then the first invocation: one token per held
    expert, so it touches every weight page once.
(b) The same with the shard evicted from the page cache (POSIX_FADV_DONTNEED) before each start, with
    the digest hashed (a fresh zygote) and found: mapping reads nothing, so the disk is read by the
    hashing or by the first invocation's page faults. Against a plain sequential read of the evicted file.
(c) Replicas exec'd as new interpreters (a container's cold start): a new process knows no digest.
(d) The in-process path (`faasmoe serve` without a gateway, and the full-model baselines): USS and PSS
    after loading the plan and one 48-token forward pass, against the bytes of its weight files.
Each start also reports the CPU its process used until ready (all threads): on a machine whose cores are
busy, ready = that CPU + the time spent waiting for a core.
Figures are reported, not asserted; the load average is saved with them (this machine may be shared).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from function_bench import BlockingForkServer, FunctionServer, request_body

from faasmoe.experts.wire import CONTENT_TYPE
from faasmoe.function.headers import COMPUTE_HEADER
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.planning.digest import RACY_WINDOW_NS
from faasmoe.planning.export import export
from faasmoe.planning.plan import FunctionSpec, Plan

RESULTS = Path(__file__).resolve().parent / "results" / "cold_start.json"
EXPERTS_PER_FUNCTION = 20
PRESET = "qwen1.5-bench"
PROMPT_TOKENS = 48
MILESTONES = ("python", "settings", "imports", "shard_verified", "weights_loaded", "listening")
TARGETS = {"forked_ready_ms": 50.0}
READ_CHUNK = 8 << 20


def prepare(work: Path, layers: int) -> tuple[Path, Path]:
    """The model and plan directories (built once per layer count, kept in ``work``)."""
    model, plan = work / f"model-l{layers}", work / f"plan-l{layers}-e{EXPERTS_PER_FUNCTION}"
    if not (model / "config.json").exists():
        print(f"init-model {PRESET} --layers {layers} ...", file=sys.stderr)
        init_model(model, InitModelOptions(preset=PRESET, layers=layers))
    if not (plan / "plan.json").exists() or Plan.load(plan).version < 3:
        print(f"export --experts-per-function {EXPERTS_PER_FUNCTION} ...", file=sys.stderr)
        export(model, plan, experts_per_function=EXPERTS_PER_FUNCTION)
    # A digest is kept only for files changed more than the racy window before they were hashed.
    newest = max(f.stat().st_ctime_ns for f in plan.rglob("*.safetensors"))
    time.sleep(max(0.0, (newest + RACY_WINDOW_NS - time.time_ns()) / 1e9 + 0.1))
    return model, plan


def evict(path: Path) -> float:
    """Drops the file from the page cache; returns the share of it still resident (mapped pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_share(path)


def resident_share(path: Path) -> float:
    """mincore(2) over a mapping of the file: the share of its pages in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private and never written
    try:
        vector = (ctypes.c_ubyte * pages)()
        start = ctypes.c_char.from_buffer(mapping)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        del start
        return sum(v & 1 for v in vector) / pages
    finally:
        mapping.close()


def sequential_read_mb_s(path: Path) -> float:
    """A plain sequential read of the evicted file: the disk's read bandwidth as a cold start meets it."""
    evict(path)
    buffer = bytearray(READ_CHUNK)
    started, total = time.perf_counter(), 0
    with path.open("rb", buffering=0) as f:
        while read := f.readinto(buffer):
            total += read
    return total / (time.perf_counter() - started) / 1e6


def cold_start(
    plan: Path, function: FunctionSpec, threads: int, forkserver: BlockingForkServer | None, evicted: bool
) -> dict:
    """One replica: its milestones (ms after process start), ready, and its first invocation."""
    shard = plan / function.shard
    resident = evict(shard) if evicted else resident_share(shard)
    server = FunctionServer(plan, function.name, threads, forkserver, {"FAASMOE_SHARD_SHA256": function.sha256})
    try:
        stats = server.wait_ready()
        body = request_body(len(function.experts), function)  # one token per held expert
        started = time.perf_counter()
        response = server.client.post("/", content=body, headers={"Content-Type": CONTENT_TYPE})
        invocation_ms = 1e3 * (time.perf_counter() - started)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
    marks = {m: 1e3 * stats["startup_s"][m] for m in MILESTONES if m in stats["startup_s"]}
    return {
        "digest": stats["shard_digest"],
        "resident_before": resident,
        "milestones_ms": marks,
        "ready_ms": max(marks["weights_loaded"], marks["listening"]),
        "cpu_ms": 1e3 * stats["cpu_s"],  # all the replica's threads, until /ready answered and /stats
        "first_invocation_ms": invocation_ms,
        "first_invocation_compute_ms": 1e3 * float(response.headers[COMPUTE_HEADER]),
        "pss_mib_at_ready": stats["memory"]["pss"] / 2**20,
    }


def median_of(runs: list[dict]) -> dict:
    keys = ("ready_ms", "cpu_ms", "first_invocation_ms", "first_invocation_compute_ms")
    medians = {key: statistics.median(run[key] for run in runs) for key in keys}
    milestones = {m: statistics.median(run["milestones_ms"][m] for run in runs) for m in runs[0]["milestones_ms"]}
    return medians | {"milestones_ms": milestones, "runs": len(runs)}


def forked(plan: Path, function: FunctionSpec, threads: int, runs: int, evicted: bool, log: Path) -> dict:
    """The first start of a fresh zygote (digest hashed), then ``runs`` more (digest reused)."""
    (plan / function.shard).read_bytes()  # hot, or hot until evicted: the same start for both
    with BlockingForkServer(log) as forkserver:
        all_runs = [cold_start(plan, function, threads, forkserver, evicted) for _ in range(runs + 1)]
    first, later = all_runs[0], all_runs[1:]
    return {"hashed": first, "reused": median_of(later), "reused_runs": later}


def exec_started(plan: Path, function: FunctionSpec, threads: int, runs: int) -> dict:
    (plan / function.shard).read_bytes()
    all_runs = [cold_start(plan, function, threads, None, evicted=False) for _ in range(runs)]
    return median_of(all_runs) | {"all_runs": all_runs}


def memory_probe(model: Path, plan: Path) -> dict:
    """In this process: the plan's in-process executor and trunk, one forward pass, then memory."""
    import torch

    from faasmoe.dispatch.executor import open_executor
    from faasmoe.memory import resident_memory
    from faasmoe.model.split_model import SplitModel

    baseline = psutil.Process().memory_full_info()
    split = SplitModel.load(model, plan, open_executor)
    sequence = split.trunk.new_sequence(list(range(1, PROMPT_TOKENS + 1)))
    with torch.inference_mode():
        split.trunk.step([sequence])
    info, resident = psutil.Process().memory_full_info(), resident_memory()
    loaded = Plan.load(plan)
    weights = (plan / loaded.trunk).stat().st_size + sum((plan / f.shard).stat().st_size for f in loaded.functions)
    return {
        "weights_bytes": weights,
        "runtime_uss_before_load": baseline.uss,
        "uss": info.uss,
        "pss": info.pss,
        "rss": info.rss,
        "anon": resident.anon,  # copied tensors, activations, the runtime's heap
        "file": resident.file,  # mapped pages: the weights the forward pass touched, libraries
    }


def in_process_memory(model: Path, plan: Path, threads: int) -> dict:
    """``memory_probe`` in a new process, so that nothing this script holds is counted."""
    command = [sys.executable, __file__, "--memory-probe", str(model), str(plan), "--threads", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(result: dict) -> str:
    def phases(entry: dict) -> str:
        return " | ".join(f"{m} {v:.1f}" for m, v in entry["milestones_ms"].items())

    def line(label: str, entry: dict) -> str:
        invocation = f"{entry['first_invocation_ms']:7.1f} ms (compute {entry['first_invocation_compute_ms']:.1f})"
        ready = f"{entry['ready_ms']:7.1f} ms (cpu {entry['cpu_ms']:.0f} ms)"
        return f"{label:<28} ready {ready} | first invocation {invocation}\n{'':<28} {phases(entry)}"

    cold, memory = result["cold_start"], result["in_process_memory"]
    gb = 1e9
    lines = [
        f"cold start of {cold['function']} ({cold['experts']} experts, {cold['shard_mb']:.0f} MB), ms after process "
        f"start (reused: median of {cold['forked_hot']['reused']['runs']}); "
        f"target: ready <= {TARGETS['forked_ready_ms']:.0f} ms",
        line("forked, hot, hashed", cold["forked_hot"]["hashed"]),
        line("forked, hot, digest reused", cold["forked_hot"]["reused"]),
        line("forked, evicted, hashed", cold["forked_evicted"]["hashed"]),
        line("forked, evicted, reused", cold["forked_evicted"]["reused"]),
        line("exec'd, hot (hashes)", cold["exec"]),
        f"disk: sequential read of the evicted shard {cold['disk_read_mb_s']:.0f} MB/s = "
        f"{1e3 * cold['shard_mb'] / cold['disk_read_mb_s']:.0f} ms for the shard",
        "",
        f"in-process path ({memory['layers']} layers): weight files {memory['weights_bytes'] / gb:.2f} GB | after "
        f"loading and one {PROMPT_TOKENS}-token forward pass: USS {memory['uss'] / gb:.2f} GB, "
        f"PSS {memory['pss'] / gb:.2f} GB "
        f"(runtime before loading {memory['runtime_uss_before_load'] / gb:.2f} GB; anon {memory['anon'] / gb:.2f}, "
        f"mapped file pages {memory['file'] / gb:.2f})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="cold starts per case (after the first, hashed one)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the replicas")
    parser.add_argument("--memory-layers", type=int, default=1, help="layers of the in-process model (2: the bench's)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "faasmoe-cold-start-bench")
    parser.add_argument("--memory-probe", type=Path, nargs=2, help=argparse.SUPPRESS)  # internal: MODEL PLAN
    args = parser.parse_args()
    if args.memory_probe:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(memory_probe(*args.memory_probe)))
        return

    model, plan = prepare(args.work_dir, layers=1)
    function = Plan.load(plan).functions[0]
    load_before = os.getloadavg()[0]
    log = args.work_dir / "function-runtime.log"
    cold = {
        "function": function.name,
        "experts": len(function.experts),
        "shard_mb": (plan / function.shard).stat().st_size / 1e6,
        "forked_hot": forked(plan, function, args.threads, args.runs, evicted=False, log=log),
        "forked_evicted": forked(plan, function, args.threads, args.runs, evicted=True, log=log),
        "exec": exec_started(plan, function, args.threads, max(1, args.runs // 2)),
        "disk_read_mb_s": statistics.median(sequential_read_mb_s(plan / function.shard) for _ in range(3)),
    }
    memory_model, memory_plan = (model, plan) if args.memory_layers == 1 else prepare(args.work_dir, args.memory_layers)
    memory = in_process_memory(memory_model, memory_plan, args.threads) | {"layers": args.memory_layers}
    result = {
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, os.getloadavg()[0]],  # before and after: other work on the machine
        "targets": TARGETS,
        "cold_start": cold,
        "in_process_memory": memory,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"\nload average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
