"""Resident memory of the trunk (control plane) against the full transformers model.

Usage: python benchmarks/trunk_memory.py [--preset qwen1.5-moe-a2.7b] [--layers 2] [--dtype bfloat16] [--model DIR]
Each side is loaded in a fresh process and runs one 32-token forward pass (so every weight it uses is
touched); memory is then read from /proc (anonymous vs file-backed) and PSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, torch
from pathlib import Path
from faasmoe.memory import resident_memory
model_dir, side = Path(sys.argv[1]), sys.argv[2]
prompt = list(range(1, 33))
if side == "full":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.inference_mode():
        model(torch.tensor([prompt]))
else:
    from concurrent.futures import Future
    from faasmoe.model.checkpoint import Checkpoint
    from faasmoe.model.trunk import Trunk

    class ZeroExperts:  # memory only: the routed experts' values do not matter here
        def submit(self, tokens):
            done = Future()
            done.set_result(torch.zeros_like(tokens.hidden))
            return done

    trunk = Trunk.load(Checkpoint.open(model_dir), ZeroExperts())
    trunk.step([trunk.new_sequence(prompt)])
print(json.dumps(resident_memory().as_dict()))
"""


def measure(model_dir: Path, side: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir), side], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", type=Path, help="an existing checkpoint (skips init-model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trunk_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="faasmoe-mem-") as scratch:
        model_dir = args.model
        if model_dir is None:
            from faasmoe.model.init_model import InitModelOptions, init_model

            model_dir = Path(scratch) / "model"
            print(f"building {args.preset} with {args.layers} layers ({args.dtype}) ...", file=sys.stderr)
            init_model(model_dir, InitModelOptions(preset=args.preset, layers=args.layers, dtype=args.dtype))
        results = {side: measure(model_dir, side) for side in ("full", "trunk")}
    gb = 1e9
    print("| process | RSS GB | anon GB | file-backed GB | PSS GB |")
    print("|---|---|---|---|---|")
    for side, m in results.items():
        print(f"| {side} | {m['rss'] / gb:.2f} | {m['anon'] / gb:.2f} | {m['file'] / gb:.2f} | {m['pss'] / gb:.2f} |")
    ratios = {kind: results["trunk"][kind] / results["full"][kind] for kind in ("rss", "anon", "pss")}
    print("\ntrunk / full: " + ", ".join(f"{kind} {ratio:.3f}" for kind, ratio in ratios.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {"preset": args.preset, "layers": args.layers, "dtype": args.dtype}
    args.out.write_text(json.dumps({"config": config, "memory": results, "trunk_over_full": ratios}, indent=2))


if __name__ == "__main__":
    main()
