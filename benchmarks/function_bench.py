"""The expert-group function on its own: invocation overhead over loopback, and its cold start.

Usage: python benchmarks/function_bench.py [--threads 2] [--iterations 200] [--cold-starts 3] [--work-dir DIR]

Model: the qwen1.5-moe-a2.7b preset with 1 layer (random weights, real shapes), exported with 20 experts
per function; the first function (experts 0-19 of layer 0, 346 MB of bf16) serves both parts.

(a) Round trip of POST / for 1 and 32 tokens of a 2048-wide bf16 hidden state (each token asks one held
    expert), with keep-alive http.client and pooled httpx, and through the embedded gateway as the
    control plane calls it (its GatewayConnection: the client on its own loop thread). Invocation
    overhead = round trip minus the server-side time of the same call (X-Faasmoe-Compute-Seconds:
    decode + partial sums + encode, on the function's compute thread), per call, so load from other
    processes on the machine hits both terms alike. For comparison: the same
    invocation in this process (same thread count, with the server stopped, so neither steals CPU from
    the other), and a raw-socket echo moving the same bytes between two processes.
(b) Cold start, split into interpreter start, server listening, imports done and weights loaded (the
    function's /stats), against a bare `python -c "import torch"`, for a replica exec'd as a new
    interpreter (a container) and one forked from the zygote (the embedded gateway's default). The
    shard is in the page cache.
Figures are reported, not asserted; the load average is saved with them (this machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from faasmoe.dispatch.remote import GatewayConnection, LoopThread
from faasmoe.experts.compute import NO_EXPERT, ExpertBatch
from faasmoe.experts.shard import load_shard
from faasmoe.experts.wire import CONTENT_TYPE, encode_batch
from faasmoe.function.headers import COMPUTE_HEADER
from faasmoe.function.invoke import Invoker
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.embedded.forkserver import ForkedProcess, ForkServer
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import FunctionSpec, Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import free_port

T = TypeVar("T")
RESULTS = Path(__file__).resolve().parent / "results" / "function_bench.json"
EXPERTS_PER_FUNCTION = 20
TOKEN_COUNTS = (1, 32)
WARMUP = 20
TARGETS = {"overhead_p50_ms": 1.0, "gateway_overhead_p50_ms": 0.3, "cold_start_ratio": 2.0}
# A child process that answers each length-prefixed message with a reply of the length it asks for.
ECHO_SERVER = """
import socket, struct, sys
listener = socket.create_server(("127.0.0.1", 0)); print(listener.getsockname()[1], flush=True)
conn = listener.accept()[0]; conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exactly(n):
    data = bytearray()
    while len(data) < n:
        data += conn.recv(n - len(data)) or sys.exit(0)
    return data
while True:
    size, reply = struct.unpack("!II", exactly(8)); exactly(size); conn.sendall(bytes(reply))
"""


def prepare(work: Path) -> tuple[Path, FunctionSpec]:
    """The exported plan (built once, kept in ``work``) and its first function."""
    model, plan = work / "model", work / f"plan-{EXPERTS_PER_FUNCTION}"
    if not (model / "config.json").exists():
        print("init-model qwen1.5-moe-a2.7b --layers 1 ...", file=sys.stderr)
        init_model(model, InitModelOptions(preset="qwen1.5-moe-a2.7b", layers=1))
    if not (plan / "plan.json").exists():
        print(f"export --experts-per-function {EXPERTS_PER_FUNCTION} ...", file=sys.stderr)
        export(model, plan, experts_per_function=EXPERTS_PER_FUNCTION)
    return plan, Plan.load(plan).functions[0]


class BlockingForkServer:
    """The embedded gateway's fork server, driven from this synchronous script (its loop runs in a thread)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.loop = LoopThread()
        self.server = ForkServer(log_path, startup_timeout_s=120.0, env=dict(os.environ))

    def spawn(self, env: dict[str, str]) -> ForkedProcess:
        return self.loop.submit(self.server.spawn(env, self.log_path)).result()

    def __enter__(self) -> BlockingForkServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.submit(self.server.close()).result()
        self.loop.stop()


class FunctionServer:
    """`python -m faasmoe.function` on a free port (or forked by ``forkserver``), stopped with SIGTERM."""

    def __init__(
        self,
        plan: Path,
        function: str,
        threads: int,
        forkserver: BlockingForkServer | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        env = {"FAASMOE_FUNCTION": function, "FAASMOE_WEIGHTS_URI": str(plan), "FAASMOE_PORT": str(self.port)}
        env |= {"FAASMOE_THREADS": str(threads), "FAASMOE_LOG_LEVEL": "warning"} | (extra_env or {})
        if forkserver is None:
            self.process = subprocess.Popen([sys.executable, "-m", "faasmoe.function"], env=os.environ | env)
        else:
            self.process = forkserver.spawn(os.environ | env)
            self.port = self.process.port  # the zygote binds the replica's socket itself
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30.0)

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Polls /ready every 10 ms; returns /stats once it answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.client.get("/ready").status_code == 200:
                    return self.client.get("/stats").json()
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.01)
        raise RuntimeError(f"function not ready (exit code {self.process.poll()})")

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def request_body(tokens: int, function: FunctionSpec) -> bytes:
    """``tokens`` rows of a bf16 hidden state; row i asks held expert i mod 20 in its first top-4 slot."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((tokens, 4), NO_EXPERT, dtype=torch.int64)
    ids[:, 0] = torch.tensor([function.experts[i % len(function.experts)][1] for i in range(tokens)])
    batch = ExpertBatch(
        hidden=torch.randn(tokens, 2048, generator=generator).to(torch.bfloat16),
        layer_ids=torch.full((tokens,), function.layers[0], dtype=torch.int64),
        expert_ids=ids,
        weights=torch.rand(tokens, 4, generator=generator).to(torch.bfloat16),
    )
    return encode_batch(batch)


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))]}


def timed(call: Callable[[], T], iterations: int) -> tuple[list[float], list[T]]:
    """Seconds per call after a warm-up, and what each call returned."""
    for _ in range(WARMUP):
        call()
    seconds, returned = [], []
    for _ in range(iterations):
        started = time.perf_counter()
        returned.append(call())
        seconds.append(time.perf_counter() - started)
    return seconds, returned


def echo_round_trips(sizes: list[tuple[int, int]], iterations: int) -> list[list[float]]:
    """Raw-socket round trips moving (request, response) bytes between this process and a child."""
    child = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        conn = socket.create_connection(("127.0.0.1", int(child.stdout.readline())))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        results = []
        for request, response in sizes:
            message = request.to_bytes(4, "big") + response.to_bytes(4, "big") + bytes(request)
            buffer = bytearray(response)

            def call(message: bytes = message, buffer: bytearray = buffer) -> None:
                conn.sendall(message)
                view, got = memoryview(buffer), 0
                while got < len(buffer):
                    got += conn.recv_into(view[got:])

            results.append(timed(call, iterations)[0])
        conn.close()
    finally:
        child.kill()
        child.wait()
    return results


def function_round_trips(server: FunctionServer, body: bytes, iterations: int) -> dict:
    """http.client and httpx round trips, each with the server-side time of the same call."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    headers = {"Content-Type": CONTENT_TYPE}

    def with_http_client() -> float:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        return float(response.getheader(COMPUTE_HEADER))

    def with_httpx() -> float:
        response = server.client.post("/", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return float(response.headers[COMPUTE_HEADER])

    results = {name: overheads(call, iterations) for name, call in (("http_client", with_http_client),
                                                                     ("httpx", with_httpx))}  # fmt: skip
    connection.close()
    return results


def overheads(call: Callable[[], float], iterations: int) -> dict:
    """Round trips of ``call`` (which returns the server-side seconds), and round trip minus server-side."""
    total, inside = timed(call, iterations)
    overhead = [t - s for t, s in zip(total, inside, strict=True)]
    return ms(total) | {"overhead": ms(overhead), "server": ms(inside)}


def gateway_round_trips(
    plan: Path, function: FunctionSpec, bodies: list[bytes], threads: int, iterations: int
) -> list[dict]:
    """The calls through `faasmoe gateway` (the function deployed from zero; the warm-up meets its cold start)."""
    with GatewayProcess(log_path=plan / "gateway.log") as gateway:
        settings = GatewaySettings.from_url(gateway.url)

        async def deploy() -> None:
            async with GatewayClient(settings) as client:
                await deploy_plan(Plan.load(plan), client, StackSettings(weights_uri=str(plan), threads=threads))

        asyncio.run(deploy())
        connection = GatewayConnection(settings)
        try:
            results = []
            for body in bodies:

                def call(body: bytes = body) -> float:
                    invoke = connection.submit(lambda c: c.invoke(function.name, body, {"Content-Type": CONTENT_TYPE}))
                    return float(invoke.result().headers[COMPUTE_HEADER])

                results.append(overheads(call, iterations))
        finally:
            connection.close()
    return results


def in_process_times(
    plan: Path, function: FunctionSpec, bodies: list[bytes], threads: int, iterations: int
) -> tuple[list[bytes], list[list[float]]]:
    """The invocation without HTTP, in this process; also the response bodies, for the raw-socket sizes."""
    torch.set_num_threads(threads)
    invoker = Invoker(load_shard(plan / function.shard))
    samples = [timed(lambda body=body: invoker(body), iterations)[0] for body in bodies]
    return [invoker(body) for body in bodies], samples


def round_trips(plan: Path, function: FunctionSpec, threads: int, iterations: int) -> list[dict]:
    bodies = [request_body(tokens, function) for tokens in TOKEN_COUNTS]
    outputs, in_process = in_process_times(plan, function, bodies, threads, iterations)
    echo = echo_round_trips([(len(b), len(o)) for b, o in zip(bodies, outputs, strict=True)], iterations)
    server = FunctionServer(plan, function.name, threads)
    try:
        server.wait_ready()
        http = [function_round_trips(server, body, iterations) for body in bodies]
    finally:
        server.stop()
    gateway = gateway_round_trips(plan, function, bodies, threads, iterations)
    return [
        {"tokens": t, "request_bytes": len(b), "response_bytes": len(o), "in_process": ms(c), "raw_socket": ms(e)}
        | h
        | {"gateway": g}
        for t, b, o, c, e, h, g in zip(TOKEN_COUNTS, bodies, outputs, in_process, echo, http, gateway, strict=True)
    ]


def cold_starts(plan: Path, function: FunctionSpec, threads: int, runs: int) -> dict:
    """Replicas exec'd as new interpreters (a container's cold start) and forked from the zygote (the
    embedded gateway's default)."""
    (plan / function.shard).read_bytes()  # page cache warm, as every start after the first finds it
    bare = statistics.median(timed_command([sys.executable, "-c", "import torch"]) for _ in range(runs))
    with BlockingForkServer(plan / "function-runtime.log") as forkserver:
        spawners = {"exec": None, "fork": forkserver}
        starts = {how: [_cold_start(plan, function, threads, by) for _ in range(runs)] for how, by in spawners.items()}
    result = {"function": function.name, "experts": len(function.experts), "weights_mb": function.bytes / 1e6}
    for how, runs_of in starts.items():
        median = {key: statistics.median(run[key] for run in runs_of) for key in runs_of[0]}
        result[how] = {"runs": runs_of, "median_s": median, "ratio_to_bare_import": median["weights_loaded"] / bare}
    return result | {"bare_import_torch_s": bare}


def _cold_start(plan: Path, function: FunctionSpec, threads: int, forkserver: BlockingForkServer | None) -> dict:
    server = FunctionServer(plan, function.name, threads, forkserver)
    try:
        stats = server.wait_ready()
    finally:
        server.stop()
    return stats["startup_s"] | {"rss_mib": stats["memory"]["rss"] / 2**20}


def timed_command(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def table(rows: list[dict], cold: dict) -> str:
    def pair(d: dict) -> str:
        return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"

    lines = [
        "| tokens | request / response | in-process | server-side | http.client | overhead | httpx | overhead "
        "| gateway | overhead | raw socket |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sizes = f"{r['request_bytes'] / 1024:.0f} / {r['response_bytes'] / 1024:.0f} KiB"
        raw, pooled, gateway = r["http_client"], r["httpx"], r["gateway"]
        cells = [r["in_process"], raw["server"], raw, raw["overhead"], pooled, pooled["overhead"]]
        cells += [gateway, gateway["overhead"], r["raw_socket"]]
        lines.append(f"| {r['tokens']} | {sizes} | " + " | ".join(pair(c) for c in cells) + " |")
    one = next(r for r in rows if r["tokens"] == 1)
    lines += [
        "",
        "(round trips: p50 / p99 ms; overhead = round trip - server-side time, per call)",
        f"1-token invocation overhead p50 / p99: straight to the function (httpx) {pair(one['httpx']['overhead'])} ms, "
        f"through the embedded gateway {pair(one['gateway']['overhead'])} ms",
        "",
        f"cold start of {cold['function']} ({cold['experts']} experts, {cold['weights_mb']:.0f} MB), "
        f"median of {len(cold['exec']['runs'])}, seconds from process start "
        f"(bare import torch: {cold['bare_import_torch_s']:.2f}):",
    ]
    for how in ("exec", "fork"):
        m = cold[how]["median_s"]
        lines.append(
            f"{how}: interpreter {m['python']:.2f} | listening {m['listening']:.2f} | imports {m['imports']:.2f} "
            f"| weights loaded {m['weights_loaded']:.2f} (load {m['weights_loaded'] - m['imports']:.2f}) "
            f"| ratio to bare import {cold[how]['ratio_to_bare_import']:.2f} | RSS {m['rss_mib']:.0f} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, here and in the function")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "faasmoe-function-bench")
    args = parser.parse_args()

    plan, function = prepare(args.work_dir)
    load_before = os.getloadavg()[0]
    rows = round_trips(plan, function, args.threads, args.iterations)
    cold = cold_starts(plan, function, args.threads, args.cold_starts)
    result = {
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, os.getloadavg()[0]],  # before and after: other work on the machine
        "torch": torch.__version__,
        "targets": TARGETS,
        "round_trip": rows,
        "cold_start": cold,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, cold))
    print(f"\nload average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
