"""Export a merged Gemma 3 folder to GGUF (text model + mmproj vision projector) with llama.cpp's own
converter, verified against PyTorch with the GGUF backend (llama-cpp-python).

The converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py/) comes from the pinned
llama-cpp-python sdist and is extracted by ./init.sh --gguf, which also installs llama-cpp-python.
OUTPUT_DIR gets model-<q>.gguf, mmproj-<q>.gguf, the tokenizer/processor files and gguf_manifest.json
(sizes, sha256, converter and package versions, fixes applied, verification).

--verify (default on): the GGUF backend scores the 8 answers on fixed samples (32 by default:
--verify_data's first records, topped up with fixed demo samples) and its button must agree with
PyTorch float32 with token_type_ids on >= 90% of them for f16/q8_0; for f32 the logits must be within
2e-3 x max(1, max |logit|) of PyTorch's. Exit 1 when a check fails, with the figure and the remedy.

    python scripts/convert_to_gguf.py --model_path models/pokemon-gemma-merged \\
        --output_dir models/pokemon-gemma-gguf --quantization q8_0
    llama-server -m models/pokemon-gemma-gguf/model-q8_0.gguf --mmproj models/pokemon-gemma-gguf/mmproj-q8_0.gguf
"""

import argparse
import sys
from pathlib import Path

from pokemon_gemma.config import load_settings_or_exit, setup_logging


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_path",
        default=settings.model_path,
        help=f"merged Gemma 3 folder (from merge_qlora.py) (env MODEL_PATH; default: {settings.model_path!r})",
    )
    parser.add_argument(
        "--output_dir",
        default="models/pokemon-gemma-gguf",
        help="GGUF folder to write (default: models/pokemon-gemma-gguf)",
    )
    parser.add_argument(
        "--quantization",
        choices=("f32", "f16", "q8_0"),
        default="q8_0",
        help="GGUF weight type of both files (llama.cpp keeps norms and embeddings of the projector in F32 and its "
        "input projection in F16 regardless) (default: q8_0)",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with PyTorch (buttons, logits); exit 1 when the check fails (default: on)",
    )
    parser.add_argument(
        "--verify_data", default=None, help="JSONL whose first records form the eval set (default: fixed demo samples)"
    )
    parser.add_argument(
        "--verify_samples", type=int, default=32, help="size of the button-agreement eval set (default: 32)"
    )
    parser.add_argument(
        "--logit_samples", type=int, default=3, help="samples whose full logits are compared (default: 3)"
    )
    parser.add_argument(
        "--llama_cpp_dir",
        default=None,
        help="llama.cpp folder with convert_hf_to_gguf.py, conversion/ and gguf-py/ (default: env "
        "LLAMA_CPP_CONVERTER_DIR, else the one ./init.sh --gguf extracted into .venv/share/pokemon-gemma/)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    return parser


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    if args.verify_samples < 1 or args.logit_samples < 1:
        parser.error("--verify_samples and --logit_samples must be at least 1")
    setup_logging(settings)
    from pokemon_gemma.export import ExportError, export_gguf
    from pokemon_gemma.export.gguf import refusal

    try:
        m = export_gguf(
            args.model_path,
            args.output_dir,
            quantization=args.quantization,
            verify=args.verify,
            overwrite=args.overwrite,
            verify_data=args.verify_data,
            n_samples=args.verify_samples,
            n_logit_samples=args.logit_samples,
            llama_cpp_dir=args.llama_cpp_dir,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    files = ", ".join(f"{f['name']} ({f['bytes'] / 1e6:.2f} MB)" for f in m["files"].values())
    t = m["timings"]
    print(
        f"exported {args.model_path} -> {args.output_dir}: {files}; convert {t['convert_s']} s "
        f"(llama.cpp {(m['converter'].get('llama_cpp_commit') or '?')[:10]})"
    )
    for fix in m["fixes_applied"]:
        print(f"  fix: {fix['change']}")
    v = m["verification"]
    if not v.get("ran"):
        print("verification skipped (--no-verify)")
        return 0
    lg, bt = v["logits"], v["buttons"]
    print(
        f"verify logits: max |GGUF - PyTorch (with token_type_ids)| = {lg['max_abs_diff']:.3g} on {lg['samples']} "
        f"samples (max |logit| {lg['max_abs_logit']:.3g}; f32 tolerance {lg['tolerance']:.3g}"
        + (" -> " + ("OK" if lg["passed"] else "FAILED") if lg["gated"] else ", not gated for " + m["quantization"])
        + f"); image features {lg['image_features_max_abs_diff']:.3g}"
    )
    clear = bt["agreement_on_clear_samples"]
    print(
        f"verify buttons: GGUF vs PyTorch with token_type_ids {bt['agreed']}/{bt['samples']} "
        f"({bt['agreement_vs_pytorch_with_token_type_ids']:.1%})"
        + (f", required {bt['required_agreement']:.0%}" if bt["required_agreement"] else "")
        + (
            f"; on the {bt['clear_samples']} samples with a margin >= {bt['clear_margin_nats']} nats {clear:.1%}"
            if clear is not None
            else ""
        )
        + (" -> " + ("OK" if bt["passed"] else "FAILED") if bt["required_agreement"] else "")
    )
    acc = bt["accuracy"]
    print(f"accuracy on these samples: GGUF {acc['gguf']:.1%}, PyTorch {acc['pytorch']:.1%}")
    tm = v["timing"]
    print(
        f"score latency (mean, {tm['threads']} thread(s)): GGUF {tm['gguf_score_s_mean']:.3f} s, "
        f"PyTorch {tm['pytorch_score_s_mean']:.3f} s"
    )
    reason = refusal(v, m["quantization"], Path(args.output_dir))
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0
