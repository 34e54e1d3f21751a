"""Build a tiny random Gemma 3 (model + tokenizer + processor) that loads like a hub id."""

import argparse
import sys

from pokemon_gemma.tiny import build_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--image_size", type=int, default=64, help="vision tower input size in pixels (multiple of 32)")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.output_dir, seed=args.seed, image_size=args.image_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny Gemma 3 written to {path}")
    return 0
