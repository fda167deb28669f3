"""The expert-group function as a real process on 127.0.0.1: readiness, exact results, errors, SIGTERM."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save, save_file
from transformers import Qwen2MoeForCausalLM

from faasmoe.experts.compute import NO_EXPERT, ExpertBatch
from faasmoe.experts.shard import load_shard
from faasmoe.experts.wire import CONTENT_TYPE, decode_output, encode_batch
from faasmoe.model.presets import preset_config
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.process import wait_until
from tests.corruption import flip_tensor_bytes

# The function must use the test process's intra-op thread count for bit-identical sums.
THREADS = 1
EXPERTS_PER_FUNCTION = 5
FUNCTION = "moe-l00-e000-004"  # layer 0, experts 0-4 of the tiny preset's 12
START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 5.0
# The module's function refuses larger bodies (the default, 64 MiB, would make the over-size tests slow).
MAX_BODY_BYTES = 1 << 20


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("function")
    torch.manual_seed(11)
    model = Qwen2MoeForCausalLM(preset_config("tiny")).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(root / "model")
    export(root / "model", root / "plan", experts_per_function=EXPERTS_PER_FUNCTION)
    return root / "plan"


@pytest.fixture(scope="module")
def plan(plan_dir: Path) -> Plan:
    return Plan.load(plan_dir)


def shard_sha256(plan: Plan, function: str = FUNCTION) -> str:
    digest = next(f.sha256 for f in plan.functions if f.name == function)
    assert digest is not None, "faasmoe export records every shard's sha256"
    return digest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FunctionProcess:
    """`python -m faasmoe.function` on a free port; always stopped, even when a test fails."""

    def __init__(self, log_path: Path, function: str, weights_uri: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {
            **os.environ,
            "FAASMOE_FUNCTION": function,
            "FAASMOE_WEIGHTS_URI": weights_uri,
            "FAASMOE_HOST": "127.0.0.1",
            "FAASMOE_PORT": str(self.port),
            "FAASMOE_THREADS": str(THREADS),
            **env,
        }
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "faasmoe.function"], env=environment, stdout=log, stderr=subprocess.STDOUT
            )
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> None:
        self._poll(lambda r: r.status_code == 200, "/health")

    def wait_loaded(self) -> httpx.Response:
        """Polls /ready until it stops answering 503; returns the final answer (200 or 500)."""
        return self._poll(lambda r: r.status_code != 503, "/ready")

    def _poll(self, done, path: str) -> httpx.Response:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"function exited with {self.process.returncode}:\n{self.log()}"
            try:
                response = self.http.get(path)
                if done(response):
                    return response
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        raise AssertionError(f"{path} did not settle within {START_TIMEOUT_S} s:\n{self.log()}")

    def invoke(self, body: bytes) -> httpx.Response:
        return self.http.post("/", content=body, headers={"Content-Type": CONTENT_TYPE})

    def terminate(self) -> int:
        """SIGTERM; returns the exit code (the process must exit within EXIT_TIMEOUT_S)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"function ignored SIGTERM for {EXIT_TIMEOUT_S} s:\n{self.log()}") from None

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[FunctionProcess] = []

    def _start(function: str, weights_uri: str, **env: str) -> FunctionProcess:
        process = FunctionProcess(tmp_path / f"{function}-{len(started)}.log", function, weights_uri, **env)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.close()


@pytest.fixture(scope="module")
def function(plan_dir: Path, plan: Plan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FunctionProcess]:
    """One loaded function for the tests that only invoke it; it must exit 0 on SIGTERM at the end.

    It verifies its shard as a deployment tells it to, and refuses bodies over MAX_BODY_BYTES.
    """
    env = {"FAASMOE_SHARD_SHA256": shard_sha256(plan), "FAASMOE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    process = FunctionProcess(tmp_path_factory.mktemp("logs") / "function.log", FUNCTION, str(plan_dir), **env)
    try:
        assert process.wait_loaded().status_code == 200, process.log()
        yield process
        assert process.terminate() == 0, process.log()
    finally:
        process.close()


def routed_batch(layer: int, experts: list[int], tokens: int = 6, top_k: int = 4, seed: int = 0) -> ExpertBatch:
    """Rows routed to some of ``experts`` (distinct per row, one slot left unasked), as the trunk sends them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((tokens, top_k), NO_EXPERT, dtype=torch.int64)
    for row in range(tokens):
        picks = torch.randperm(len(experts), generator=generator)[: top_k - 1]
        ids[row, : top_k - 1] = torch.tensor(experts)[picks]
    return ExpertBatch(
        hidden=torch.randn(tokens, 64, generator=generator).to(torch.bfloat16),
        layer_ids=torch.full((tokens,), layer, dtype=torch.int64),
        expert_ids=ids,
        weights=torch.rand(tokens, top_k, generator=generator).to(torch.bfloat16),
    )


def expected_output(plan_dir: Path, batch: ExpertBatch) -> torch.Tensor:
    torch.set_num_threads(THREADS)
    with torch.inference_mode():
        return load_shard(plan_dir / "functions" / f"{FUNCTION}.safetensors").partial_sum(batch)


def test_ready_and_stats_report_the_load(function: FunctionProcess, plan: Plan) -> None:
    assert function.http.get("/health").status_code == 200
    assert function.http.get("/ready").json() == {"status": "ready"}
    stats = function.http.get("/stats").json()
    spec = next(f for f in plan.functions if f.name == FUNCTION)
    assert stats["function"] == FUNCTION and stats["state"] == "ready" and stats["error"] is None
    assert stats["experts"]["count"] == len(spec.experts) == EXPERTS_PER_FUNCTION
    assert [tuple(pair) for pair in stats["experts"]["held"]] == [tuple(pair) for pair in spec.experts]
    assert stats["weights_bytes"] == spec.bytes
    marks = stats["startup_s"]
    assert 0 <= marks["python"] <= marks["listening"] and 0 < marks["imports"] <= marks["weights_loaded"]
    assert stats["startup_phases_s"]["total"] == marks["weights_loaded"]
    assert stats["memory"]["rss"] > 0 and stats["memory"]["anon"] > 0
    assert stats["threads"]["torch_intra_op"] == THREADS


def test_invocation_equals_in_process_partial_sum(function: FunctionProcess, plan_dir: Path) -> None:
    batch = routed_batch(layer=0, experts=list(range(EXPERTS_PER_FUNCTION)))
    response = function.invoke(encode_batch(batch))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    assert int(response.headers["X-Faasmoe-Invocation"]) >= 1
    output = decode_output(response.content)
    expected = expected_output(plan_dir, batch)
    assert output.dtype == torch.float32 and output.shape == (6, 64)
    assert torch.equal(output, expected)


def _without(batch: ExpertBatch, field: str) -> bytes:
    tensors = {name: getattr(batch, name) for name in ("hidden", "layer_ids", "expert_ids", "weights")}
    del tensors[field]
    return save(tensors)


def _replace(batch: ExpertBatch, **fields: torch.Tensor) -> bytes:
    values = {name: getattr(batch, name) for name in ("hidden", "layer_ids", "expert_ids", "weights")}
    return encode_batch(ExpertBatch(**{**values, **fields}))


GOOD = routed_batch(layer=0, experts=[0, 1, 2, 3, 4], seed=1)
BAD_BODIES = {
    "expert not held": (_replace(GOOD, expert_ids=GOOD.expert_ids.masked_fill(GOOD.expert_ids == 3, 7)), "expert 7"),
    "layer not held": (_replace(GOOD, layer_ids=torch.ones_like(GOOD.layer_ids)), "of layer 1 is not held"),
    "wrong dtype": (_replace(GOOD, hidden=GOOD.hidden.float()), "hidden must be torch.bfloat16"),
    "wrong hidden size": (_replace(GOOD, hidden=torch.zeros(6, 32, dtype=torch.bfloat16)), "hidden must be [T, 64]"),
    "garbage body": (b"this is not safetensors", "not a valid safetensors payload"),
    "empty body": (b"", "empty body"),
    "missing tensor": (_without(GOOD, "weights"), "lacks tensor(s) ['weights']"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_request_is_400_and_the_function_keeps_serving(
    function: FunctionProcess, plan_dir: Path, case: str
) -> None:
    body, message = BAD_BODIES[case]
    response = function.invoke(body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    good = function.invoke(encode_batch(GOOD))
    assert good.status_code == 200, good.text
    assert torch.equal(decode_output(good.content), expected_output(plan_dir, GOOD))


class GatedFiles(SimpleHTTPRequestHandler):
    """Serves a directory, but holds every GET until the test opens the gate (a slow weights server)."""

    gate = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.gate.wait()
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def files_server(plan_dir: Path, gate: threading.Event) -> Iterator[str]:
    """Serves ``plan_dir``'s parent on a free port; yields the plan's URL. GETs wait for ``gate``."""
    handler = type("Gated", (GatedFiles,), {"gate": gate})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(plan_dir.parent)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{plan_dir.name}"
    finally:
        gate.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def weights_server(plan_dir: Path) -> Iterator[tuple[str, threading.Event]]:
    gate = threading.Event()
    with files_server(plan_dir, gate) as url:
        yield url, gate


def test_http_weights_503_while_loading_then_exact(start, weights_server, plan_dir: Path, tmp_path: Path) -> None:
    url, gate = weights_server
    cache = tmp_path / "cache"
    process = start(FUNCTION, url, FAASMOE_LOAD_WAIT_S="0.3", FAASMOE_CACHE_DIR=str(cache))
    process.wait_listening()
    assert process.http.get("/ready").status_code == 503  # the download is held at the gate
    waited = process.invoke(encode_batch(GOOD))
    assert waited.status_code == 503 and waited.headers["Retry-After"] == "1", waited.text
    assert "still loading" in waited.json()["error"]
    gate.set()
    assert process.wait_loaded().status_code == 200, process.log()
    response = process.invoke(encode_batch(GOOD))
    assert response.status_code == 200, response.text
    assert response.headers["X-Faasmoe-Invocation"] == "1"  # the first invocation this replica served
    assert torch.equal(decode_output(response.content), expected_output(plan_dir, GOOD))
    assert list(cache.glob("*")) == []  # the downloaded file is dropped once its tensors are in memory


def _drop_expert(plan_dir: Path, tmp_path: Path) -> Path:
    """A copy of the plan whose function shard declares 5 experts but lost expert 2's down projection."""
    from safetensors import safe_open

    source = plan_dir / "functions" / f"{FUNCTION}.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.0.mlp.experts.2.down_proj.weight"}
    broken = tmp_path / "broken-plan"
    (broken / "functions").mkdir(parents=True)
    save_file(tensors, str(broken / "functions" / source.name), metadata=metadata)
    return broken


def test_load_failures_answer_500_naming_the_problem(start, plan_dir: Path, tmp_path: Path) -> None:
    # Both start at once: the two cold starts overlap.
    missing = start("moe-l09-e000-004", str(plan_dir))
    lacking = start(FUNCTION, (_drop_expert(plan_dir, tmp_path)).as_uri())
    for process, message in [
        (missing, "functions/moe-l09-e000-004.safetensors does not exist"),
        (lacking, "lacks expert 2 of layer 0"),
    ]:
        ready = process.wait_loaded()
        assert ready.status_code == 500 and message in ready.json()["error"], ready.text
        invoked = process.invoke(encode_batch(GOOD))
        assert invoked.status_code == 500 and message in invoked.json()["error"], invoked.text
        assert process.http.get("/stats").json()["state"] == "failed"
        assert process.terminate() == 0, process.log()


def _corrupt_copy(plan_dir: Path, tmp_path: Path) -> Path:
    """A copy of the plan whose function shard has flipped bytes in its tensor data (header intact)."""
    corrupt = tmp_path / "corrupt-plan"
    (corrupt / "functions").mkdir(parents=True)
    shard = corrupt / "functions" / f"{FUNCTION}.safetensors"
    shutil.copyfile(plan_dir / "functions" / shard.name, shard)
    flip_tensor_bytes(shard)
    load_shard(shard)  # the damage the header cannot tell: unverified, it would load and serve wrong sums
    return corrupt


def test_corrupt_shard_fails_the_load_naming_it(start, plan_dir: Path, plan: Plan, tmp_path: Path) -> None:
    corrupt = _corrupt_copy(plan_dir, tmp_path)
    recorded = shard_sha256(plan)
    actual = hashlib.sha256((corrupt / "functions" / f"{FUNCTION}.safetensors").read_bytes()).hexdigest()
    # A long load wait: an invocation must not wait for a load that has already failed.
    env = {"FAASMOE_SHARD_SHA256": recorded, "FAASMOE_LOAD_WAIT_S": "60", "FAASMOE_CACHE_DIR": str(tmp_path / "c")}
    opened = threading.Event()
    opened.set()
    with files_server(corrupt, opened) as url:
        # The shard as a local file and as a download, both started at once: the two cold starts overlap.
        processes = [start(FUNCTION, corrupt.as_uri(), **env), start(FUNCTION, url, **env)]
        for process in processes:
            ready = process.wait_loaded()
            assert ready.status_code == 500 and ready.json()["status"] == "failed", ready.text
            error = ready.json()["error"]
            assert f"{FUNCTION}.safetensors is corrupt" in error, error
            assert f"sha256 is {actual[:12]}..." in error and f"recorded {recorded[:12]}..." in error, error
            started = time.monotonic()
            invoked = process.invoke(encode_batch(GOOD))
            assert time.monotonic() - started < EXIT_TIMEOUT_S
            assert invoked.status_code == 500 and error in invoked.json()["error"], invoked.text
            assert process.terminate() == 0, process.log()


def raw_exchange(port: int, head: bytes, body_parts: Iterable[bytes] = ()) -> tuple[int, dict, bytes]:
    """Sends a request byte for byte (no client library decides for us); returns status, JSON body, headers.

    Reads until the server closes the connection, as it must after refusing a body it has not read.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        with contextlib.suppress(ConnectionResetError):  # a reset may follow the answer; the answer is read
            while chunk := sock.recv(1 << 16):
                received += chunk
    headers, _, body = received.partition(b"\r\n\r\n")
    return int(headers.split()[1]), json.loads(body), headers.lower()


def request_head(**headers: str | int) -> bytes:
    lines = [
        "POST / HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {CONTENT_TYPE}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_still_exact(function: FunctionProcess, plan_dir: Path) -> None:
    good = function.invoke(encode_batch(GOOD))
    assert good.status_code == 200, good.text
    assert torch.equal(decode_output(good.content), expected_output(plan_dir, GOOD))


def test_over_size_body_is_413_before_it_is_sent(function: FunctionProcess, plan_dir: Path) -> None:
    # Issue 14 item 9: a 100 MB invocation was accepted. Only the headers go: the answer cannot wait for the body.
    status, body, headers = raw_exchange(function.port, request_head(**{"Content-Length": 100_000_000}))
    assert status == 413 and "exceeds the limit of 1048576 bytes" in body["error"], body
    assert b"connection: close" in headers
    assert_still_exact(function, plan_dir)


def test_over_size_chunked_body_is_413_once_past_the_limit(function: FunctionProcess, plan_dir: Path) -> None:
    chunk = bytes(64 << 10)
    chunks = MAX_BODY_BYTES // len(chunk) + 1  # one past the limit; no terminating chunk is ever sent
    framed = (b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(chunks))
    status, body, _ = raw_exchange(function.port, request_head(**{"Transfer-Encoding": "chunked"}), framed)
    assert status == 413 and "exceeds the limit of 1048576 bytes" in body["error"], body
    # A body of exactly the limit is read and judged on its content.
    at_limit = function.invoke(bytes(MAX_BODY_BYTES))
    assert at_limit.status_code == 400, at_limit.text
    assert_still_exact(function, plan_dir)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(start, weights_server) -> None:
    url, _gate = weights_server  # never opened: the loader thread stays blocked in its download
    process = start(FUNCTION, url, FAASMOE_LOAD_WAIT_S="1.5")
    process.wait_listening()
    body = encode_batch(GOOD)
    with socket.create_connection(("127.0.0.1", process.port), timeout=10.0) as sock:
        sock.sendall(request_head(**{"Content-Length": len(body)}) + body)
        assert wait_until(lambda: read_by_peer(sock), START_TIMEOUT_S), "the function did not read the request"
        # The request is now waiting for the weights.
        started = time.monotonic()
        assert process.terminate() == 0, process.log()
        answer = sock.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 503 "), f"the in-flight request got no answer: {answer!r}"
    assert time.monotonic() - started < EXIT_TIMEOUT_S


def read_by_peer(sock: socket.socket) -> bool:
    """The far end of a loopback TCP connection has read all that ``sock`` sent (its receive queue is empty).

    On loopback the bytes are in that queue once sendall returns, so this tells the server took the request.
    """
    ours, theirs = sock.getsockname()[1], sock.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, _, queues, *_ = line.split()
        if int(local.rpartition(":")[2], 16) == theirs and int(remote.rpartition(":")[2], 16) == ours:
            return int(queues.partition(":")[2], 16) == 0
    return False


def test_stats_json_is_plain(function: FunctionProcess) -> None:
    # Everything /stats says must survive a JSON round trip (no NaN, no custom types).
    stats = function.http.get("/stats").json()
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats


def test_imports_stay_lean() -> None:
    # The server must listen before torch is imported, and no function module may pull in transformers
    # (about 1.5 s of cold start); the Dockerfile does not even install it.
    code = (
        "import sys\n"
        "import faasmoe.function.server, faasmoe.function.loader, faasmoe.function.stats\n"
        "print('torch' in sys.modules)\n"
        "import faasmoe.function.invoke, faasmoe.function.weights, faasmoe.experts.shard\n"
        "print('transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"], result.stdout
