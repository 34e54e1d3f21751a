"""Export a merged Gemma 3 folder to Apple MLX with mlx-vlm (vision tower kept), verified against PyTorch.

mlx-vlm only converts a transformers-5 Gemma 3 folder correctly after fixes to its config and weight
names (several would otherwise fail silently); they are applied to a copy, each only when needed,
and listed in OUTPUT/export_manifest.json with the versions and the verification figures. The
converter runs offline (HF_HUB_OFFLINE=1) in a subprocess.

--verify (default on): MLX float32 logits vs PyTorch without token_type_ids within 1e-3 on fixed
samples; with quantisation the button the export picks agrees with PyTorch's on >= 90% of a fixed
eval set (32 samples by default: --verify_data's first records, topped up with fixed demo samples).
Agreement with PyTorch *with* token_type_ids (bidirectional attention inside images, as in
training; mlx-vlm is causal there) is printed too. Exit 1 when a check fails, with the figure
(k/n agreed vs the 90% required) and the remedy (--quantization_bits 8|none, or --no-verify).

    python scripts/convert_to_mlx.py --model_path models/pokemon-gemma-merged \\
        --output_path models/pokemon-gemma-mlx --quantization_bits 4
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.config import load_settings_or_exit, setup_logging


def _bits(text: str):
    if text.lower() == "none":
        return None
    if text in ("4", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"must be 4, 8 or none, got {text!r}")


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_path",
        default=settings.model_path,
        help=f"merged Gemma 3 folder (from merge_qlora.py) (env MODEL_PATH; default: {settings.model_path!r})",
    )
    parser.add_argument(
        "--output_path",
        default="models/pokemon-gemma-mlx",
        help="MLX folder to write (default: models/pokemon-gemma-mlx)",
    )
    parser.add_argument(
        "--quantization_bits",
        type=_bits,
        default=4,
        metavar="{4,8,none}",
        help="weight quantisation of the language model (vision tower and projector stay "
        "unquantised); none keeps the source dtype (default: 4)",
    )
    parser.add_argument("--group_size", type=int, default=64, help="quantisation group size (default: 64)")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with PyTorch (logits and chosen buttons); exit 1 when a check fails (default: on)",
    )
    parser.add_argument(
        "--verify_data", default=None, help="JSONL whose first records form the eval set (default: fixed demo samples)"
    )
    parser.add_argument(
        "--verify_samples",
        type=int,
        default=32,
        help="size of the button-agreement eval set (default: 32; --verify_data with fewer records is topped up "
        "with fixed demo samples)",
    )
    parser.add_argument(
        "--logit_samples", type=int, default=3, help="samples whose full logits are compared (default: 3)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output_path if it exists")
    return parser


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    if args.verify_samples < 1 or args.logit_samples < 1 or args.group_size < 1:
        parser.error("--verify_samples, --logit_samples and --group_size must be at least 1")
    setup_logging(settings)
    from pokemon_gemma.export import ExportError, export_mlx
    from pokemon_gemma.export.mlx import refusal

    try:
        m = export_mlx(
            args.model_path,
            args.output_path,
            quantization_bits=args.quantization_bits,
            group_size=args.group_size,
            verify=args.verify,
            overwrite=args.overwrite,
            verify_data=args.verify_data,
            n_samples=args.verify_samples,
            n_logit_samples=min(args.logit_samples, args.verify_samples),
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    quant = f"{args.quantization_bits}-bit" if args.quantization_bits else m["dtype"]
    print(f"exported {args.model_path} -> {args.output_path} ({quant}, convert {m['timings']['convert_s']} s)")
    for fix in m["fixes_applied"]:
        print(f"  fix: {fix['change']}")
    if not m["fixes_applied"]:
        print("  no fixes needed")
    v = m["verification"]
    if not v.get("ran"):
        print("verification skipped (--no-verify)")
        return 0
    lg, bt = v["logits"], v["buttons"]
    print(
        f"verify logits: max |MLX fp32 - PyTorch (no token_type_ids)| = {lg['max_abs_diff']:.3g} "
        f"(tolerance {lg['tolerance']:g}, {lg['samples']} samples) -> {'OK' if lg['passed'] else 'FAILED'}"
    )
    print(
        f"verify buttons on {bt['samples']} samples: MLX vs PyTorch without token_type_ids "
        f"{bt['agreement_vs_pytorch_causal']:.1%}"
        + (f" (required {bt['required_agreement']:.0%})" if bt["required_agreement"] else "")
        + f"; vs PyTorch with token_type_ids {bt['agreement_vs_pytorch_with_token_type_ids']:.1%}"
        f"; PyTorch with vs without {bt['pytorch_causal_vs_with_token_type_ids']:.1%}"
        f" -> {'OK' if bt['passed'] else 'FAILED'}"
    )
    acc = bt["accuracy"]
    print(
        f"accuracy on these samples: MLX {acc['mlx']:.1%}, PyTorch causal {acc['pytorch_causal']:.1%}, "
        f"PyTorch with token_type_ids {acc['pytorch_with_token_type_ids']:.1%}"
    )
    t = v["timing"]
    print(f"score latency (mean): MLX {t['mlx_score_s_mean']:.3f} s, PyTorch {t['pytorch_score_s_mean']:.3f} s")
    reason = refusal(v, args.quantization_bits, Path(args.output_path))
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0
