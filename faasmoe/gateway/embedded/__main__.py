"""``python -m faasmoe.gateway.embedded --host 127.0.0.1 --port 8080``: serve the embedded gateway."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faasmoe.errors import FaasmoeError
from faasmoe.gateway.embedded.options import settings_from_options
from faasmoe.gateway.embedded.server import run_gateway

_USAGE_ERROR = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faasmoe.gateway.embedded", description=__doc__)
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8080)")
    parser.add_argument("--idle-timeout", type=float, help="seconds idle before scale to zero (default 300)")
    parser.add_argument("--basic-auth", metavar="USER:PASSWORD", help="credentials for /system/*")
    parser.add_argument("--cold-start-timeout", type=float, help="seconds a replica may take to be ready")
    parser.add_argument("--function-command", help="command of a replica, shell-quoted")
    parser.add_argument(
        "--function-spawn",
        choices=["fork", "exec"],
        help="fork faasmoe's function replicas from a pre-imported runtime, or exec each anew (default fork)",
    )
    parser.add_argument("--log-dir", type=Path, help="directory of the function logs (default: a temp dir)")
    parser.add_argument("--reaper-interval", type=float, help="seconds between idleness checks")
    parser.add_argument(
        "--scale-to-zero",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default for functions without the com.openfaas.scale.zero label (default on)",
    )
    parser.add_argument("--log-level", help="debug, info, warning, ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_options(
            args.host,
            args.port,
            args.idle_timeout,
            args.basic_auth,
            cold_start_timeout=args.cold_start_timeout,
            function_command=args.function_command,
            function_spawn=args.function_spawn,
            log_dir=args.log_dir,
            reaper_interval=args.reaper_interval,
            scale_to_zero=args.scale_to_zero,
            log_level=args.log_level,
        )
        run_gateway(settings)
    except (FaasmoeError, ValueError) as exc:
        print(f"faasmoe gateway: {exc}", file=sys.stderr)
        return _USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
