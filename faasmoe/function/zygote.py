"""`python -m faasmoe.function.zygote`: the function runtime imported once, forking replicas on request.

A replica spends most of a cold start importing torch (about 1.4 s of CPU, 150 MB of private memory
per process). The embedded gateway starts this process once; it imports everything a replica needs
and then forks each replica, which only reads its settings and loads its own shard. Forked replicas
share the imported runtime's pages copy-on-write, so N replicas hold it about once, not N times.
(Serverless platforms call this a zygote or a pre-initialised runtime.)

The gateway starts it with a minimal environment (gateway/embedded/config.py), never its own
credentials: a forked replica sets its deployment's variables in ``os.environ``, but the kernel keeps
showing the zygote's initial environment as the replica's /proc/PID/environ.

Each replica gets its listening socket from here: bound to a port the OS picks before the fork, so the
port is the replica's from the start (FAASMOE_LISTEN_FD; FAASMOE_PORT tells it), and the reply says which.

Protocol: JSON lines on stdin/stdout.
    in:  {"env": {...}, "log": "/path/of/the/replica.log"}     fork a replica with this environment
    out: {"ready": true}                                         once, after the imports
         {"spawned": pid, "port": port} | {"error": "..."}       one per request, in order
         {"exited": pid, "returncode": code}                     when a replica ends (negative: signal)
    A replica that hashed its shard reports the digest on a pipe to the zygote (faasmoe.planning.digest), so
    the replicas forked later know it and map the unchanged file without reading it.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import traceback
from typing import IO

from faasmoe.function.main import idle_threads_sleep
from faasmoe.function.timeline import fork_clock
from faasmoe.parent_death import die_with_parent
from faasmoe.planning.digest import HASHED_FILES
from faasmoe.process import listening_socket


def preload() -> None:
    """Everything a replica imports, so that a forked replica imports nothing heavy."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    # What uvicorn imports as it starts a server (uvicorn.Config.load): 10-40 ms of a cold start otherwise.
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.auto  # noqa: F401
    import uvicorn.protocols.http.auto  # noqa: F401
    import uvicorn.protocols.websockets.auto  # noqa: F401

    import faasmoe.experts.shard  # noqa: F401
    import faasmoe.function.invoke  # noqa: F401
    import faasmoe.function.main  # noqa: F401
    import faasmoe.function.server  # noqa: F401
    import faasmoe.function.weights  # noqa: F401
    from faasmoe.function.settings import FunctionSettings

    # The first settings read pays pydantic-settings' one-time set-up (3-5 ms of a replica's CPU); the
    # prefix keeps the zygote's own environment out of it.
    FunctionSettings(_env_prefix="FAASMOE_ZYGOTE_WARM_UP_", function="warm-up", weights_uri="/")


def serve(requests: int, replies: IO[str]) -> None:
    """Forks a replica per request line read from fd ``requests`` and reports replicas' exits, until it closes."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd is written
    signal.set_wakeup_fd(wake_write)
    # Replicas report the shard digests they computed here, so that later replicas inherit them.
    digests_read, digests_write = os.pipe()
    os.set_blocking(digests_write, False)
    _reply(replies, {"ready": True})
    zygote = os.getpid()
    pending = digests_pending = b""
    while True:
        readable, _, _ = select.select([requests, wake_read, digests_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
            _reap(replies)
        if digests_read in readable:
            *reports, digests_pending = (digests_pending + os.read(digests_read, 1 << 16)).split(b"\n")
            for report in reports:
                HASHED_FILES.learn_line(report)
        if requests not in readable:
            continue
        chunk = os.read(requests, 1 << 16)
        if not chunk:
            return  # the gateway is gone; replicas get SIGTERM from their parent-death signal
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            try:
                request = json.loads(line)
                env = request["env"]
                listener = listening_socket(env.get("FAASMOE_HOST", "127.0.0.1"))
            except (ValueError, KeyError, OSError) as exc:
                _reply(replies, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            port = listener.getsockname()[1]
            forked_at = fork_clock()
            try:
                pid = os.fork()  # nothing is left in ``replies``' buffer to be written twice: _reply flushes
            except OSError as exc:
                listener.close()
                _reply(replies, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            if pid == 0:
                os.close(wake_read)
                os.close(wake_write)
                os.close(digests_read)
                HASHED_FILES.report_to(digests_write)
                env |= {"FAASMOE_LISTEN_FD": str(listener.fileno()), "FAASMOE_PORT": str(port)}
                _become_replica(zygote, env, request["log"], forked_at)  # stdin (requests) is replaced there
            listener.close()  # the replica holds it now
            _reply(replies, {"spawned": pid, "port": port})


def _become_replica(zygote: int, env: dict[str, str], log: str, forked_at: float) -> None:
    """In the forked child: detach, redirect output to the log, run the function server; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # its own process group, which the gateway signals to stop it
        die_with_parent()
        if os.getppid() != zygote:  # the zygote died before the parent-death signal was set
            os._exit(1)
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        for source, target in ((null_fd, 0), (log_fd, 1), (log_fd, 2)):
            os.dup2(source, target)
        os.close(log_fd)
        os.close(null_fd)
        os.environ.clear()
        os.environ.update(env)

        from faasmoe.function.main import run
        from faasmoe.function.timeline import PYTHON, Timeline

        timeline = Timeline(forked_at)
        timeline.mark(PYTHON)
        code = run(timeline)
    except SystemExit as exc:  # SIGTERM's handler exits this way
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(replies: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply(replies, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def _reply(replies: IO[str], message: dict) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()


def main() -> int:
    # The gateway's death ends the zygote, whose death ends every replica (each has a parent-death signal).
    die_with_parent()
    idle_threads_sleep()  # read once, when torch loads OpenMP: here, for every replica forked later
    preload()
    # A collection in a replica would write to every object the imports made, copying their pages.
    gc.freeze()
    replies = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to the log, not into the protocol
    serve(sys.stdin.fileno(), replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
