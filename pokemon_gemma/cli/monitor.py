"""Watch the inference server: polls /health, /ready, /metrics and a real /v1/predict probe every
--interval seconds, prints a status line and appends one JSON line per check to --output.
Exit code 0 if the last check was healthy, 1 if unhealthy (a down server is never healthy), 2 on usage errors."""

import argparse
import sys

from pokemon_gemma.monitor import HealthMonitor, Thresholds, run_monitor
from pokemon_gemma.serve.client import load_probe_frames, read_api_key


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--server_url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--max_checks", type=int, default=None, help="stop after N checks (default: run until Ctrl-C)")
    parser.add_argument(
        "--latency_threshold_ms",
        type=float,
        default=5000.0,
        help="a predict probe slower than this marks the server unhealthy",
    )
    parser.add_argument(
        "--error_rate_threshold",
        type=float,
        default=0.05,
        help="share of requests answered 5xx between checks above which the server is unhealthy",
    )
    parser.add_argument("--output", default="status.jsonl", help="JSONL file that gets one line per check ('' = none)")
    parser.add_argument(
        "--probe_frames",
        default=None,
        help="folder with 4 PNG/JPEG frames for the predict probe (default: synthetic frames)",
    )
    parser.add_argument("--alert_webhook", default=None, help="URL that gets a JSON POST when the status changes")
    parser.add_argument(
        "--api_key_env", default=None, metavar="VAR", help="environment (or .env) variable holding the server's API key"
    )
    parser.add_argument(
        "--wait_ready",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for /ready (a server that is still loading the model)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before one HTTP call counts as failed")
    args = parser.parse_args(argv)
    if not args.server_url.startswith(("http://", "https://")):
        parser.error(f"--server_url {args.server_url!r} must start with http:// or https://")
    if args.interval < 0 or (args.max_checks is not None and args.max_checks < 1):
        parser.error("--interval must be >= 0 and --max_checks >= 1")
    try:
        frames = load_probe_frames(args.probe_frames) if args.probe_frames else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    monitor = HealthMonitor(
        args.server_url,
        Thresholds(args.latency_threshold_ms, args.error_rate_threshold),
        frames,
        read_api_key(args.api_key_env),
        args.timeout,
        args.alert_webhook,
    )
    return run_monitor(
        monitor,
        interval_s=args.interval,
        max_checks=args.max_checks,
        output=args.output or None,
        wait_ready_s=args.wait_ready,
    )
