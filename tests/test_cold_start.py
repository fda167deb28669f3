"""Cheap cold starts: shards mapped in the layout the maths reads, digests verified once per file.

Issue 13 ("a cold start itself costs little"): a format-2 shard is mapped, not copied; an old plan's
format-1 shards still load, into copies, with the same results bit for bit; a file is hashed once per
identity, so a replica forked after another one verified the shard maps it without reading it, and
a shard modified after that is hashed again, and refused, on the next cold start.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import LoopThread
from faasmoe.experts.compute import NO_EXPERT, ExpertBatch
from faasmoe.experts.shard import FORMAT_PROJECTIONS, GATE_UP, load_shard, save_file_atomically
from faasmoe.experts.wire import CONTENT_TYPE, decode_output, encode_batch
from faasmoe.gateway.embedded.forkserver import ForkedProcess, ForkServer
from faasmoe.model.checkpoint import expert_key
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.digest import RACY_WINDOW_NS, DigestCheck, HashedFiles, file_sha256
from faasmoe.planning.export import export
from faasmoe.planning.plan import PLAN_FILE, Plan
from tests.conftest import TEST_THREADS
from tests.corruption import flip_tensor_bytes
from tests.reference import load_reference, reference_greedy

PROMPT = [5, 17, 200, 3, 9]
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def plan_dir(tiny_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format-2 plan of the tiny bf16 model, old enough that its files' digests are kept once hashed."""
    plan_dir = tmp_path_factory.mktemp("cold-start") / "plan"
    export(tiny_bf16, plan_dir, experts_per_function=5)
    newest = max(f.stat().st_ctime_ns for f in plan_dir.rglob("*.safetensors"))
    wait_for(lambda: time.time_ns() - newest > RACY_WINDOW_NS, "the plan's files to be past the racy window")
    return plan_dir


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def batch(function_experts: list[tuple[int, int]], tokens: int = 6) -> ExpertBatch:
    """``tokens`` rows asking the function's experts round robin (two slots each) in bf16, seeded."""
    generator = torch.Generator().manual_seed(7)
    layer = function_experts[0][0]
    experts = [e for _, e in function_experts]
    ids = torch.full((tokens, 4), NO_EXPERT, dtype=torch.int64)
    for row in range(tokens):
        ids[row, 0], ids[row, 2] = experts[row % len(experts)], experts[(row + 1) % len(experts)]
    return ExpertBatch(
        hidden=torch.randn(tokens, 64, generator=generator).to(torch.bfloat16),
        layer_ids=torch.full((tokens,), layer, dtype=torch.int64),
        expert_ids=ids,
        weights=torch.rand(tokens, 4, generator=generator).to(torch.bfloat16),
    )


def mapped_files() -> set[str]:
    """The files this process maps (/proc/self/maps: address, perms, offset, device, inode, path)."""
    fields = [line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines()]
    return {f[5].strip() for f in fields if len(f) == 6}


def downgrade(plan_dir: Path, out: Path) -> Path:
    """The plan as faasmoe wrote it before plan version 3: gate, up and down apart (shard format 1)."""
    plan = Plan.load(plan_dir)
    (out / "functions").mkdir(parents=True)
    for function in plan.functions:
        with safe_open(str(plan_dir / function.shard), framework="pt") as f:
            metadata = f.metadata() | {"format": FORMAT_PROJECTIONS}
            tensors = {}
            for layer, expert in function.experts:
                gate, up = f.get_tensor(expert_key(layer, expert, GATE_UP)).chunk(2, dim=0)
                tensors[expert_key(layer, expert, "gate_proj")] = gate.contiguous()
                tensors[expert_key(layer, expert, "up_proj")] = up.contiguous()
                tensors[expert_key(layer, expert, "down_proj")] = f.get_tensor(expert_key(layer, expert, "down_proj"))
        save_file_atomically(tensors, out / function.shard, metadata)
        function.sha256 = file_sha256(out / function.shard)
    (out / plan.trunk).write_bytes((plan_dir / plan.trunk).read_bytes())
    document = json.loads(plan.model_dump_json()) | {"version": 2}
    (out / PLAN_FILE).write_text(json.dumps(document))
    return out


def test_a_shard_is_mapped_and_an_old_format_shard_copied_with_the_same_sums(plan_dir: Path, tmp_path: Path):
    plan = Plan.load(plan_dir)
    old_dir = downgrade(plan_dir, tmp_path / "old")
    function = plan.functions[1]
    new_shard, old_shard = plan_dir / function.shard, old_dir / function.shard
    new, old = load_shard(new_shard, function.sha256), load_shard(old_shard, file_sha256(old_shard))
    # Format 2: the weights are the file's pages, not copies; format 1 lets the file go once copied.
    assert str(new_shard) in mapped_files() and str(old_shard) not in mapped_files()
    assert new.experts.keys() == old.experts.keys()
    for key, weights in new.experts.items():
        assert torch.equal(weights.gate_up, old.experts[key].gate_up)
        assert torch.equal(weights.down, old.experts[key].down)
    asked = batch(function.experts)
    assert torch.equal(new.partial_sum(asked), old.partial_sum(asked))


def test_a_version_2_plan_of_format_1_shards_serves_the_reference_tokens(tiny_bf16: Path, plan_dir: Path, tmp_path):
    old_dir = downgrade(plan_dir, tmp_path / "old")
    expected = reference_greedy(load_reference(tiny_bf16), [PROMPT], 6)
    for directory, version in ((old_dir, 2), (plan_dir, 3)):
        split = SplitModel.load(tiny_bf16, directory, open_executor)
        try:
            assert split.plan.version == version
            assert generate(split.trunk, [PROMPT], SamplingParams(max_new_tokens=6)) == expected
        finally:
            split.close()


def test_a_file_is_hashed_once_per_identity(plan_dir: Path, tmp_path: Path) -> None:
    plan = Plan.load(plan_dir)
    function = plan.functions[0]
    shard = tmp_path / "shard.safetensors"
    shard.write_bytes((plan_dir / function.shard).read_bytes())
    hashed = HashedFiles()

    def check() -> DigestCheck:
        with shard.open("rb") as file:
            digest, how = hashed.digest(file)
        assert digest == function.sha256
        return how

    # Just written: a change within the same timestamp tick would not show, so nothing is kept yet.
    assert [check(), check()] == [DigestCheck.HASHED, DigestCheck.HASHED] and hashed.hashed == 2
    written = shard.stat().st_ctime_ns
    wait_for(lambda: time.time_ns() - written > RACY_WINDOW_NS, "the copy to be past the racy window")
    assert [check(), check(), check()] == [DigestCheck.HASHED, DigestCheck.REUSED, DigestCheck.REUSED]
    assert hashed.hashed == 3
    flip_tensor_bytes(shard)  # in place: same inode and size, a new ctime
    with shard.open("rb") as file:
        digest, how = hashed.digest(file)
    assert how is DigestCheck.HASHED and digest != function.sha256 and hashed.hashed == 4


def test_export_replaces_files_so_a_mapped_shard_stays_intact(tiny_bf16: Path, tmp_path: Path) -> None:
    plan = export(tiny_bf16, tmp_path / "plan", experts_per_function=5)
    shard = tmp_path / "plan" / plan.functions[0].shard
    before = shard.stat().st_ino
    experts = load_shard(shard, plan.functions[0].sha256)
    kept = {key: w.gate_up.clone() for key, w in experts.experts.items()}
    export(tiny_bf16, tmp_path / "plan", experts_per_function=5)
    assert shard.stat().st_ino != before  # a new file under the name; the mapped one is untouched
    assert all(torch.equal(experts.experts[key].gate_up, gate_up) for key, gate_up in kept.items())


class Zygote:
    """The embedded gateway's fork server, driven synchronously; replicas are stopped on exit."""

    def __init__(self, plan_dir: Path, log_dir: Path) -> None:
        self.plan_dir, self.log_dir = plan_dir, log_dir
        self.loop = LoopThread()
        self.server = ForkServer(log_dir / "zygote.log", startup_timeout_s=DEADLINE_S, env=dict(os.environ))
        self.replicas: list[ForkedProcess] = []

    def spawn(self, function: str, sha256: str) -> tuple[ForkedProcess, httpx.Client]:
        env = dict(os.environ) | {
            "FAASMOE_FUNCTION": function,
            "FAASMOE_WEIGHTS_URI": str(self.plan_dir),
            "FAASMOE_SHARD_SHA256": sha256,
            "FAASMOE_THREADS": str(TEST_THREADS),
        }
        log = self.log_dir / f"replica-{len(self.replicas)}.log"
        replica = self.loop.submit(self.server.spawn(env, log)).result()
        self.replicas.append(replica)
        return replica, httpx.Client(base_url=f"http://127.0.0.1:{replica.port}", timeout=10.0)

    def stop(self, replica: ForkedProcess) -> None:
        replica.terminate()
        assert replica.wait(timeout=DEADLINE_S) == 0

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *_: object) -> None:
        for replica in self.replicas:
            if replica.poll() is None:
                replica.terminate()
                replica.wait(timeout=DEADLINE_S)
        self.loop.submit(self.server.close()).result()
        self.loop.stop()


def settled(client: httpx.Client) -> httpx.Response:
    """/ready once it stops answering 503 (loading)."""
    return wait_for(lambda: (r := client.get("/ready")).status_code != 503 and r, "the replica to load")


@pytest.fixture
def zygote(plan_dir: Path, tmp_path: Path) -> Iterator[Zygote]:
    with Zygote(plan_dir, tmp_path) as zygote:
        yield zygote


def test_forked_replicas_hash_a_shard_once_and_catch_it_modified(plan_dir: Path, zygote: Zygote, tmp_path: Path):
    function = Plan.load(plan_dir).functions[2]
    asked = batch(function.experts)
    expected = load_shard(plan_dir / function.shard, function.sha256).partial_sum(asked)
    digests = []
    for _ in range(3):  # the first replica hashes the shard; the next ones inherit its digest from the zygote
        replica, client = zygote.spawn(function.name, function.sha256)
        with client:
            assert settled(client).status_code == 200
            digests.append(client.get("/stats").json()["shard_digest"])
            answer = client.post("/", content=encode_batch(asked), headers={"Content-Type": CONTENT_TYPE})
            assert answer.status_code == 200, answer.text
            assert torch.equal(decode_output(answer.content), expected)
        zygote.stop(replica)
    assert digests == ["hashed", "reused", "reused"]

    shard = plan_dir / function.shard
    flip_tensor_bytes(shard)  # after the verified loads: in place, so only its ctime tells
    try:
        replica, client = zygote.spawn(function.name, function.sha256)
        with client:
            ready = settled(client)
            assert ready.status_code == 500 and ready.json()["status"] == "failed", ready.text
            assert f"{function.name}.safetensors is corrupt" in ready.json()["error"]
        zygote.stop(replica)
    finally:
        flip_tensor_bytes(shard)  # the same bytes inverted back: the module's plan is whole again
