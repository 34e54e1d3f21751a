"""Merge (`merge`), MLX export (`mlx`, with the converter fixes in `mlx_fixes`) and what they share
(`common`): each writes a verified folder with a manifest, staged and swapped into place."""

from .common import ExportError, VerifySample, fixed_samples, load_samples, package_versions
from .merge import MERGE_TOLERANCE, merge_lora
from .mlx import export_mlx, verify_mlx

__all__ = [
    "MERGE_TOLERANCE",
    "ExportError",
    "VerifySample",
    "export_mlx",
    "fixed_samples",
    "load_samples",
    "merge_lora",
    "package_versions",
    "verify_mlx",
]
