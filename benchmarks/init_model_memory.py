"""Peak memory of `faasmoe init-model`, which streams the checkpoint to disk one layer at a time.

Usage: python benchmarks/init_model_memory.py [--preset qwen1.5-moe-a2.7b] [--layers N] [--dtype bfloat16]
       [--max-shard-size 5GB] [--dir /tmp]
Runs the command in a subprocess, writing into a temporary directory under --dir that is deleted
afterwards (the default, all 24 layers of Qwen1.5-MoE-A2.7B, writes 28.6 GB). Prints the peak RSS (the
kernel's high-water mark of the child, from getrusage), the largest anonymous memory and PSS seen by
sampling /proc, the bytes written and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from faasmoe.memory import resident_memory

SAMPLE_INTERVAL_S = 0.1


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="faasmoe-init-", dir=args.dir) as scratch:
        out = Path(scratch) / "model"
        command = [sys.executable, "-m", "faasmoe.cli", "init-model", str(out), "--preset", args.preset]
        command += ["--dtype", args.dtype, "--max-shard-size", args.max_shard_size]
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peaks = {"anon": 0, "pss": 0}
        sampler = threading.Thread(target=_sample, args=(child, peaks), daemon=True)
        sampler.start()
        stderr = child.communicate()[1]
        seconds = time.perf_counter() - started
        sampler.join()
        if child.returncode != 0:
            raise SystemExit(f"init-model failed ({child.returncode}):\n{stderr[-2000:]}")
        files = [p for p in out.iterdir() if p.is_file()]
        return {
            "preset": args.preset,
            "layers": args.layers,
            "dtype": args.dtype,
            "max_shard_size": args.max_shard_size,
            "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # kB on Linux
            "peak_anon_sampled": peaks["anon"],
            "peak_pss_sampled": peaks["pss"],
            "bytes_written": sum(p.stat().st_size for p in files),
            "weight_files": sum(p.suffix == ".safetensors" for p in files),
            "seconds": round(seconds, 1),
        }


def _sample(child: subprocess.Popen, peaks: dict[str, int]) -> None:
    while child.poll() is None:
        try:
            memory = resident_memory(child.pid)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            return  # it exited between the poll and the read
        peaks["anon"] = max(peaks["anon"], memory.anon)
        peaks["pss"] = max(peaks["pss"], memory.pss)
        time.sleep(SAMPLE_INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--layers", type=int, help="default: the preset's depth")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--dir", type=Path, help="where the temporary checkpoint goes (default: $TMPDIR)")
    result = run(parser.parse_args())
    gb = 1e9
    print(
        f"{result['preset']} layers={result['layers'] or 'all'} {result['dtype']}: "
        f"peak RSS {result['peak_rss'] / gb:.2f} GB, peak anon {result['peak_anon_sampled'] / gb:.2f} GB, "
        f"peak PSS {result['peak_pss_sampled'] / gb:.2f} GB (sampled every {SAMPLE_INTERVAL_S} s), "
        f"{result['bytes_written'] / gb:.2f} GB written in {result['weight_files']} weight files, "
        f"{result['seconds']} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
