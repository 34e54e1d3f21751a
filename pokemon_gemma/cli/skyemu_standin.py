"""Serve the demo world with SkyEmu's HTTP Control Server API (/ping, /status, /screen, /input, /step),
so the SkyEmu harness can be run and tested without the emulator or a ROM. Binds 127.0.0.1 by default.

Example: pokemon-gemma-skyemu-standin --port 8080 --seed 0 --goals 3
"""

import argparse
import sys

from pokemon_gemma.play.skyemu_standin import make_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080, SkyEmu's usual)")
    parser.add_argument(
        "--seed", type=int, default=0, help="world seed: same seed + presses = same screens (default 0)"
    )
    parser.add_argument("--goals", type=int, default=3, help="goals per episode reported in /status (default 3)")
    parser.add_argument("--world_size", type=int, default=12, help="world width/height in tiles, >= 8 (default 12)")
    parser.add_argument(
        "--question_rate",
        type=float,
        default=0.7,
        help="chance a goal's dialogue ends with a YES/NO question (default 0.7)",
    )
    parser.add_argument(
        "--dialogue_rate",
        type=float,
        default=0.0,
        help="chance per press of an unrelated message box (default 0; the demo data used 0.08)",
    )
    args = parser.parse_args(argv)
    if args.world_size < 8:
        parser.error("--world_size must be at least 8 (the screen is 8x8 tiles)")
    if args.goals < 1:
        parser.error("--goals must be at least 1")
    for name in ("question_rate", "dialogue_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must be between 0 and 1")
    try:
        server = make_server(
            args.host,
            args.port,
            seed=args.seed,
            goals=args.goals,
            world_size=args.world_size,
            question_rate=args.question_rate,
            dialogue_rate=args.dialogue_rate,
        )
    except OSError as exc:
        print(
            f"error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}) (choose another --port)",
            file=sys.stderr,
        )
        return 1
    print(f"SkyEmu stand-in (demo world, seed {args.seed}) on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
