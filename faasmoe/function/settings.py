"""The function's settings, read from FAASMOE_* environment variables (the OpenFaaS way to configure a function)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from faasmoe.planning.digest import Sha256

# of-watchdog's default upstream_url is http://127.0.0.1:5000: the function listens there behind it.
DEFAULT_PORT = 5000
# A 4096-token prefill at hidden 2048 in fp32 is 32 MiB of hidden states, plus routing: twice that is generous.
DEFAULT_MAX_BODY_BYTES = 64 << 20


class FunctionSettings(BaseSettings):
    """Everything one function replica is told; FAASMOE_FUNCTION and FAASMOE_WEIGHTS_URI are required."""

    # Other faasmoe components read FAASMOE_GATEWAY_* and such from the same environment: ignore them.
    model_config = SettingsConfigDict(env_prefix="FAASMOE_", extra="ignore")

    function: str = Field(min_length=1, description="the plan's function name; the shard is functions/<name>")
    weights_uri: str = Field(
        min_length=1, description="the plan directory: a local path, a file:// URI or an http(s):// URL"
    )
    shard_sha256: Sha256 | None = Field(
        default=None, description="the plan's sha256 of the shard: verified before loading; None loads it unverified"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    listen_fd: int | None = Field(
        default=None,
        ge=0,
        description="an inherited listening socket to serve on instead of binding host:port (the embedded "
        "gateway binds it, so no other process can take the port between choosing and binding)",
    )
    # Exactness across processes needs the control plane's intra-op thread count; None keeps torch's default.
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")
    load_wait_s: float = Field(default=60.0, ge=0, description="how long a request waits for the weights")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 503 while still loading")
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES, ge=1, description="larger invocation bodies are refused with 413 unread"
    )
    cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "faasmoe-weights", description="where http(s) shards are downloaded"
    )
    # The tensors map the downloaded file, which lives on unnamed until the replica exits: deleting its
    # name at once leaves nothing behind on scale to zero, unless asked to keep it.
    keep_download: bool = False
    download_timeout_s: float = Field(default=60.0, gt=0, description="connect/read timeout of the download")
    download_chunk_bytes: int = Field(default=1 << 20, ge=4096)
    # Idle keep-alive connections stay open this long; longer than clients' pools keep them (the gateway
    # or of-watchdog), so a client never sends on a connection the server is just closing (uvicorn: 5 s).
    keep_alive_s: int = Field(default=75, ge=1)
    log_level: str = "info"
