"""Merge (`merge`), MLX export (`mlx`, with the converter fixes in `mlx_fixes`), GGUF export (`gguf`,
with llama.cpp's converter from `llama_cpp`) and what they share (`common`): each writes a verified
folder with a manifest, staged and swapped into place."""

from .common import (
    MIN_BUTTON_AGREEMENT,
    ExportError,
    VerifySample,
    fixed_samples,
    load_samples,
    package_versions,
)
from .gguf import GGUF_QUANTIZATIONS, export_gguf, verify_gguf
from .merge import MERGE_TOLERANCE, merge_lora
from .mlx import export_mlx, verify_mlx

__all__ = [
    "GGUF_QUANTIZATIONS",
    "MERGE_TOLERANCE",
    "MIN_BUTTON_AGREEMENT",
    "ExportError",
    "VerifySample",
    "export_gguf",
    "export_mlx",
    "fixed_samples",
    "load_samples",
    "merge_lora",
    "package_versions",
    "verify_gguf",
    "verify_mlx",
]
