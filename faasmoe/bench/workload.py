"""Multi-tenant request traces: generated (Poisson bursts with idle gaps) or replayed from a file.

A trace is JSON lines, one request each, in time order:

    {"t": 1.25, "tenant": "tenant-0", "prompt_tokens": 48, "max_tokens": 32}
    {"t": 1.90, "tenant": "tenant-1", "prompt_ids": [17, 942, 5], "max_tokens": 16}

``t`` is seconds from the start of the run. A request without ``prompt_ids`` gets ``prompt_tokens``
random ids, drawn from a generator seeded by the run's seed and the request's index, so a replay
sends exactly the same tokens. The benchmark saves the trace it ran (with the ids) next to its results.

Generated prompts come from their tenant's *domain*: a seeded set of token ids no other tenant's prompts
use, as tenants of a trained MoE write about different things and so route to different experts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faasmoe.bench.settings import BenchSettings

# The tokenizer's special tokens are ids 0-2 (endoftext, im_start, im_end): prompts avoid them.
FIRST_ORDINARY_ID = 3
# Prompt ids are drawn from the ids the bench tokenizer can produce, as real text would be.
PROMPT_ID_LIMIT = 4096


@dataclass(frozen=True)
class TraceRequest:
    t: float
    tenant: str
    prompt_ids: list[int]
    max_tokens: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass(frozen=True)
class Trace:
    requests: list[TraceRequest]
    tenants: list[str]
    duration_s: float  # the run lasts at least this long, idle tail included
    source: str  # "generated" or the replayed file
    params: dict[str, object] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def routed_tokens(self) -> int:
        """Tokens the routers read: every prompt token, and every output token but the last (never read back)."""
        return sum(len(r.prompt_ids) + r.max_tokens - 1 for r in self.requests)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(r.to_json() + "\n" for r in self.requests))

    def only(self, tenant: str) -> Trace:
        """This tenant's requests, at their times: its share of the trace."""
        mine = [r for r in self.requests if r.tenant == tenant]
        return Trace(mine, [tenant], self.duration_s, self.source, self.params)


def generate_trace(settings: BenchSettings, vocab_size: int, domain_seed: int | None = None) -> Trace:
    """Every tenant alternates ``burst_s`` active (Poisson arrivals at ``rate``) and ``idle_s`` idle.

    Idle gaps longer than the functions' idle timeout are where scale to zero saves memory and where the
    next request meets cold functions; with ``stagger`` 0 the tenants are active together (a shared daily
    peak, and the whole system idle between), with 1 their bursts are spread evenly over the cycle.
    ``domain_seed`` (default: the seed) draws the tenants' domains: the same tenants with other requests.
    """
    names = [f"tenant-{i}" for i in range(settings.tenants)]
    domain_seed = settings.seed if domain_seed is None else domain_seed
    domains = tenant_domains(names, settings.domain_size, domain_seed, vocab_size)
    requests: list[TraceRequest] = []
    for index, tenant in enumerate(names):
        rng = random.Random(f"{settings.seed}:arrivals:{tenant}")
        offset = settings.stagger * settings.cycle * index / len(names)
        for number, t in enumerate(_arrival_times(rng, settings, offset)):
            key = f"{settings.seed}:{tenant}:{number}"
            prompt = prompt_ids(settings.prompt_len.sample(rng), key, vocab_size, domains[tenant])
            requests.append(TraceRequest(t, tenant, prompt, settings.output_len.sample(rng)))
    requests.sort(key=lambda r: (r.t, r.tenant))
    fields = {"rate", "burst", "idle", "stagger", "prompt_len", "output_len", "seed"}
    params = settings.model_dump(include=fields) | {"domain_size": len(domains[names[0]])}
    return Trace(requests, names, settings.duration, "generated", params)


def tenant_domains(tenants: list[str], size: int | None, seed: int, vocab_size: int) -> dict[str, list[int]]:
    """Each tenant's token ids: disjoint sets of ``size`` ids (None: the ordinary ids shared out equally;
    0: every tenant all of them), drawn with ``seed``."""
    ids = list(range(FIRST_ORDINARY_ID, _id_limit(vocab_size)))
    if size == 0:
        return {tenant: ids for tenant in tenants}
    share = len(ids) // len(tenants)
    if share == 0 or (size is not None and size > share):
        raise ValueError(
            f"{len(tenants)} tenant domains of {size or 1} token ids need {len(tenants) * (size or 1)} ids; "
            f"the model has {len(ids)} ordinary ids (a smaller --domain-size, or 0 for no domains)"
        )
    random.Random(f"{seed}:domains").shuffle(ids)
    size = size or share
    return {tenant: sorted(ids[i * size : (i + 1) * size]) for i, tenant in enumerate(tenants)}


def _arrival_times(rng: random.Random, settings: BenchSettings, offset: float) -> list[float]:
    """Poisson arrivals on the tenant's active time, mapped onto wall time around the idle gaps."""
    times: list[float] = []
    active = 0.0
    while settings.requests is None or len(times) < settings.requests:
        active += rng.expovariate(settings.rate)
        if settings.idle > 0:
            cycle = math.floor(active / settings.burst)
            wall = offset + cycle * settings.cycle + (active - cycle * settings.burst)
        else:
            wall = offset + active
        if wall >= settings.duration:
            break
        times.append(round(wall, 4))
    return times


def prompt_ids(length: int, key: str, vocab_size: int, domain: list[int] | None = None) -> list[int]:
    """``length`` ordinary token ids (of ``domain`` if given), the same for the same ``key`` (seed and
    request) on every run."""
    rng = random.Random(f"prompt:{key}")
    if domain is not None:
        return [rng.choice(domain) for _ in range(length)]
    return [rng.randrange(FIRST_ORDINARY_ID, _id_limit(vocab_size)) for _ in range(length)]


def _id_limit(vocab_size: int) -> int:
    return max(FIRST_ORDINARY_ID + 1, min(vocab_size, PROMPT_ID_LIMIT))


def load_trace(path: Path, seed: int, vocab_size: int) -> Trace:
    """Reads a JSON-lines trace; raises ValueError naming the line of a malformed record."""
    requests: list[TraceRequest] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            t, tenant, max_tokens = float(record["t"]), str(record["tenant"]), int(record["max_tokens"])
            ids = [int(i) for i in record.get("prompt_ids") or []]
            if not ids:
                ids = prompt_ids(int(record["prompt_tokens"]), f"{seed}:line:{number}", vocab_size)
            request = TraceRequest(t, tenant, ids, max_tokens)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: bad trace record ({exc!r}): {line[:200]}") from None
        if t < 0 or max_tokens < 1 or not request.prompt_ids or max(request.prompt_ids) >= vocab_size:
            raise ValueError(f"{path}:{number}: need t >= 0, max_tokens >= 1 and prompt ids below {vocab_size}")
        requests.append(request)
    if not requests:
        raise ValueError(f"{path} holds no requests")
    requests.sort(key=lambda r: (r.t, r.tenant))
    tenants = sorted({r.tenant for r in requests})
    return Trace(requests, tenants, requests[-1].t, str(path), {"seed": seed})
