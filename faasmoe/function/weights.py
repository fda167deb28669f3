"""Where a function's shard is: `<weights_uri>/functions/<name>.safetensors`, local or downloaded over http(s)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from faasmoe.errors import ShardError
from faasmoe.files import atomic_path
from faasmoe.function.settings import FunctionSettings
from faasmoe.planning.plan import SHARD_DIR  # imports torch: this module is only used by the background loader

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".safetensors"
HTTP_SCHEMES = ("http", "https")


def shard_uri(weights_uri: str, function: str) -> str:
    return f"{weights_uri.rstrip('/')}/{SHARD_DIR}/{function}{SHARD_SUFFIX}"


def is_remote(weights_uri: str) -> bool:
    return urlparse(weights_uri).scheme in HTTP_SCHEMES


def local_shard_path(settings: FunctionSettings) -> Path:
    """The shard's path for a local path or file:// weights URI."""
    parsed = urlparse(settings.weights_uri)
    base = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(settings.weights_uri)
    return base / SHARD_DIR / f"{settings.function}{SHARD_SUFFIX}"


def download_shard(settings: FunctionSettings) -> Path:
    """Streams the shard into the cache directory (atomically: a partial file never has the final name)."""
    import httpx  # only http(s) weights need it

    url = shard_uri(settings.weights_uri, settings.function)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    target = settings.cache_dir / f"{settings.function}{SHARD_SUFFIX}"
    started = time.perf_counter()
    try:
        with (
            atomic_path(target) as partial,
            httpx.stream("GET", url, timeout=settings.download_timeout_s, follow_redirects=True) as response,
        ):
            if response.status_code != httpx.codes.OK:
                raise ShardError(f"shard {url} could not be downloaded: HTTP {response.status_code}")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(settings.download_chunk_bytes):
                    out.write(chunk)
    except httpx.HTTPError as exc:
        raise ShardError(f"shard {url} could not be downloaded: {exc!r}") from exc
    seconds = time.perf_counter() - started
    size = target.stat().st_size
    logger.info("downloaded %s (%.1f MB) in %.2f s", url, size / 1e6, seconds)
    return target
