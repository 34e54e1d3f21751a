"""One table of exports beside each other: format, size, and how often each picks PyTorch's button on
its own verification samples (read from export_manifest.json / gguf_manifest.json).

    python -m pokemon_gemma.export.compare models/pokemon-gemma-mlx models/pokemon-gemma-gguf
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..artifacts import GGUF_MANIFEST, MLX_MANIFEST, read_json


def _share(buttons: dict[str, Any], key: str) -> str:
    n, value = buttons.get("samples"), buttons.get(key)
    if not n or value is None:
        return "n/a"
    return f"{round(value * n)}/{n} ({value:.1%})"


def export_row(folder: str | Path) -> dict[str, str]:
    """What the table shows for one MLX or GGUF export folder."""
    folder = Path(folder)
    mlx, gguf = read_json(folder / MLX_MANIFEST), read_json(folder / GGUF_MANIFEST)
    manifest = mlx or gguf
    if manifest is None:
        return {"export": str(folder), "format": "? (no export manifest)"}
    v = manifest.get("verification") or {}
    buttons = v.get("buttons") or {}
    if mlx:
        q = mlx.get("quantization")
        fmt = f"MLX {q['bits']}-bit" if q else f"MLX {mlx.get('dtype')}"
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        causal = _share(buttons, "agreement_vs_pytorch_causal")
    else:
        fmt = f"GGUF {gguf.get('quantization')}"
        size = sum(f.get("bytes", 0) for f in (gguf.get("files") or {}).values() if isinstance(f, dict))
        causal = "n/a (bidirectional)"
    logits = (v.get("logits") or {}).get("max_abs_diff")
    return {
        "export": str(folder),
        "format": fmt,
        "size": f"{size / 1e6:.2f} MB",
        "agreement (PyTorch with token_type_ids)": _share(buttons, "agreement_vs_pytorch_with_token_type_ids")
        if v.get("ran")
        else "not verified",
        "agreement (PyTorch causal images)": causal if v.get("ran") else "not verified",
        "max logit diff": f"{logits:.3g}" if isinstance(logits, (int, float)) else "n/a",
        "verification": ("passed" if v.get("passed") else "FAILED") if v.get("ran") else "skipped",
    }


def table(folders: list[str | Path]) -> str:
    rows = [export_row(f) for f in folders]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    folders = sys.argv[1:] if argv is None else argv
    if not folders:
        print("usage: python -m pokemon_gemma.export.compare EXPORT_DIR [EXPORT_DIR ...]", file=sys.stderr)
        return 2
    print(table(folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
