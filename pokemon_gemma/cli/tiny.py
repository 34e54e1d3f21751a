"""Build a tiny random model of one family (model + tokenizer + processor) that loads like a hub id."""

import argparse
import sys

from pokemon_gemma.families import FAMILIES, FamilyError, get_family


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--family", default="gemma3", choices=list(FAMILIES), help="model family")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument(
        "--image_size", type=int, default=64, help="Gemma 3: vision tower input size in pixels (multiple of 32)"
    )
    parser.add_argument(
        "--image_tokens", type=int, default=70, help="Gemma 4: soft-token budget per image (70/140/280/560/1120)"
    )
    parser.add_argument(
        "--hidden_size",
        type=int,
        default=64,
        help="width of the language model (and of Gemma 3's vision tower); a multiple of 64",
    )
    parser.add_argument(
        "--bidirectional_images",
        action="store_true",
        help="Gemma 4: images attend bidirectionally on sliding layers (use_bidirectional_attention='vision', "
        "the 26B-A4B/31B setting; E2B/E4B attend causally)",
    )
    args = parser.parse_args(argv)
    family = get_family(args.family)
    if args.hidden_size <= 0 or args.hidden_size % 64:
        print(f"error: --hidden_size {args.hidden_size}: use a positive multiple of 64", file=sys.stderr)
        return 2
    kwargs = {"max_soft_tokens": args.image_tokens} if family.image_budgets else {"image_size": args.image_size}
    kwargs["hidden_size"] = args.hidden_size
    if args.bidirectional_images:
        if family.name != "gemma4":
            print(f"error: --bidirectional_images is a Gemma 4 setting, not {family.display}'s", file=sys.stderr)
            return 2
        kwargs["bidirectional"] = "vision"
    try:
        path = family.build_tiny(args.output_dir, seed=args.seed, **kwargs)
    except (ValueError, FamilyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny {family.display} written to {path}")
    return 0
