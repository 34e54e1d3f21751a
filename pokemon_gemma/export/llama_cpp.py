"""llama.cpp's own HF -> GGUF converter, taken from the pinned llama-cpp-python sdist.

PyPI has llama-cpp-python 0.3.36 only as an sdist; it vendors llama.cpp, whose converter is
`vendor/llama.cpp/convert_hf_to_gguf.py` plus its `conversion/` package (one module per model
family; Gemma 3 is `conversion/gemma.py`) and the vendored `gguf-py/`. The installed wheel holds
none of them, and PyPI's `gguf` 0.19.0 is an older snapshot under the same version string that
this converter cannot run with. So `./init.sh --gguf` extracts exactly those three paths from the
same sdist into the virtual environment (`fetch_converter`, idempotent, stamped with the sdist's
sha256 and the vendored llama.cpp commit); the GGUF export runs the converter from there.

    python -c "from pokemon_gemma.export.llama_cpp import main; main(['fetch'])"   # what init.sh runs
    (main(['fetch', '--sdist', FILE, '--dest', DIR]) for a given sdist/folder; main(['where']): the one in use)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, file_sha256, now_iso
from .common import ExportError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_ENV = "LLAMA_CPP_CONVERTER_DIR"
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
STAMP = "pokemon-gemma-converter.json"
INSTALL_HINT = (
    f"run ./init.sh --gguf (installs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} and extracts its converter), "
    f"or set {CONVERTER_ENV} / pass --llama_cpp_dir to a llama.cpp folder holding convert_hf_to_gguf.py"
)


def default_converter_dir(prefix: str | Path = sys.prefix) -> Path:
    """Where `fetch_converter` puts the converter: inside the virtual environment."""
    return Path(prefix) / "share" / "pokemon-gemma" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def _complete(folder: Path) -> bool:
    return (
        (folder / "convert_hf_to_gguf.py").is_file()
        and (folder / "conversion").is_dir()
        and (folder / "gguf-py" / "gguf").is_dir()
    )


def find_converter(explicit: str | Path | None = None) -> Path:
    """The llama.cpp folder to convert with: `explicit`, else $LLAMA_CPP_CONVERTER_DIR, else the one
    `./init.sh --gguf` extracted. ExportError (exit 2) naming the remedy when it is missing."""
    chosen = explicit or os.environ.get(CONVERTER_ENV) or default_converter_dir()
    folder = Path(chosen)
    if not _complete(folder):
        raise ExportError(
            f"{folder}: llama.cpp's converter not found (convert_hf_to_gguf.py, conversion/, gguf-py/); {INSTALL_HINT}",
            code=2,
        )
    return folder


def converter_info(folder: Path) -> dict[str, Any]:
    """What the manifest records about the converter: its stamp (sdist version, sha256, llama.cpp
    commit) when `fetch_converter` made it, and gguf-py's own version string."""
    info: dict[str, Any] = {"dir": str(folder)}
    stamp = folder / STAMP
    if stamp.is_file():
        try:
            info.update(json.loads(stamp.read_text()))
        except ValueError:
            pass
    pyproject = folder / "gguf-py" / "pyproject.toml"
    if pyproject.is_file():
        for line in pyproject.read_text().splitlines():
            if line.startswith("version"):
                info["gguf_py_version"] = line.split("=", 1)[1].strip().strip('"')
                break
    return info


def download_sdist(dest: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """`pip download` the sdist (the only file PyPI has for this version) into `dest`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(dest),
        f"llama-cpp-python=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExportError(f"pip download llama-cpp-python=={version} failed: {tail[0]}")
    return found[0]


def extract_converter(sdist: Path, dest: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Extract only convert_hf_to_gguf.py, conversion/ and gguf-py/ of the sdist's vendored llama.cpp
    into `dest` (replaced atomically), with a stamp."""
    top = f"llama_cpp_python-{version}/"
    prefix = top + "vendor/llama.cpp/"
    commit = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tf:
            members = []
            for member in tf.getmembers():
                rest = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if rest and rest.startswith(CONVERTER_PATHS) and (member.isfile() or member.isdir()):
                    member.name = rest
                    members.append(member)
                elif member.name == top + ".git/modules/vendor/llama.cpp/HEAD":
                    commit = tf.extractfile(member).read().decode().strip()
            if not members:
                raise ExportError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside (not the expected sdist)")
            tf.extractall(tmp, members=members, filter="data")
        if not _complete(tmp):
            raise ExportError(f"{sdist}: the converter is incomplete (need {', '.join(CONVERTER_PATHS)})")
        atomic_write_json(
            tmp / STAMP,
            {
                "llama_cpp_python": version,
                "sdist": sdist.name,
                "sdist_sha256": file_sha256(sdist),
                "llama_cpp_commit": commit,
                "extracted": list(CONVERTER_PATHS),
                "created": now_iso(),
            },
        )
        os.chmod(tmp, 0o755)
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_converter(dest: str | Path | None = None, sdist: str | Path | None = None) -> tuple[Path, bool]:
    """Make sure `dest` holds this version's converter; (folder, whether it was (re)extracted)."""
    dest = Path(dest) if dest else default_converter_dir()
    stamp = dest / STAMP
    if _complete(dest) and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION:
                return dest, False
        except ValueError:
            pass
    if sdist:
        return extract_converter(Path(sdist), dest), True
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
        return extract_converter(download_sdist(Path(tmp)), dest), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="extract the converter from the sdist (downloaded when --sdist is not given)")
    fetch.add_argument("--sdist", default=None, help=f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz to use")
    fetch.add_argument("--dest", default=None, help=f"target folder (default: {default_converter_dir()})")
    sub.add_parser("where", help="print the converter folder the GGUF export would use")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            folder, changed = fetch_converter(args.dest, args.sdist)
            info = converter_info(folder)
            state = "extracted" if changed else "already present"
            print(f"llama.cpp converter {state}: {folder} (llama.cpp {info.get('llama_cpp_commit') or '?'})")
        else:
            print(find_converter())
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
