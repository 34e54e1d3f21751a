"""Atomic writes (temp file or folder in the same folder, then rename) and JSONL reading.

Everything written here gets the permissions an ordinary file or folder would get under the
process umask (0644/0755 under the usual 022): `mkstemp` alone would leave files at 0600,
unreadable to a teammate or a serving user, and so does safetensors >= 0.8 (`save_pretrained`),
so `staged_dir` makes everything it publishes readable (`make_readable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now_iso() -> str:
    """The UTC time recorded in manifests, reports and state files."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_umask() -> int:
    """The process umask without changing it (Linux reports it in /proc; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK


def make_readable(folder: str | Path) -> None:
    """Add the read bits (and, on folders, the enter bits) an ordinary file or folder gets under the
    umask to everything under `folder`. Libraries that write through private temp files leave 0600:
    safetensors >= 0.8 does, so every `save_pretrained` would write unreadable weights."""
    read, enter = 0o444 & ~_UMASK, 0o111 & ~_UMASK

    def add(path: str, bits: int) -> None:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode) and mode & bits != bits:
            os.chmod(path, stat.S_IMODE(mode) | bits)

    add(str(folder), read | enter)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            add(os.path.join(root, name), read | enter)
        for name in files:
            add(os.path.join(root, name), read)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Stream rows to a temp file, then rename: readers never see a half-written file."""
    with atomic_open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write through a temp file in the same folder; renamed over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _staging_name(final: Path, tag: str) -> str:
    return f".{final.name}.{tag}-{os.getpid()}"


def remove_stale_staging(final: str | Path) -> list[Path]:
    """Remove staging folders of `final` left by processes that no longer run (a killed export can
    leave a full model copy behind); returns what was removed."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.[a-z0-9_-]+-(\d+)$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def replace_dir(new: Path, final: Path) -> None:
    """Swap a finished folder into place; the previous one, if any, is removed after the swap."""
    old = final.with_name(_staging_name(final, "old"))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def move_entries(source: Path, dest: Path, names: Iterable[str] | None = None) -> None:
    """Move the entries of `source` into `dest`, each replacing its namesake (one rename each). With
    `names`, exactly those entries are made to match: one missing from `source` is removed from `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else [p.name for p in source.iterdir()]:
        item, target = source / name, dest / name
        if not item.exists():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            continue
        if target.is_dir() and not item.is_dir():
            shutil.rmtree(target)
        if item.is_dir() and target.exists():
            replace_dir(item, target)
        else:
            os.replace(item, target)


@contextmanager
def staged_dir(final: str | Path, *, tag: str = "staging", merge: bool = False) -> Iterator[Path]:
    """Write a folder beside `final`; it takes `final`'s place only when the block succeeds.

    The staging folder `.<name>.<tag>-<pid>` sits in the same parent (same file system, so the rename
    is atomic); on any error it is removed and `final` is untouched. `merge=True` moves the staged
    entries into an existing `final` one by one instead of replacing the folder (a run folder that
    also holds checkpoints). Staging folders of dead processes are cleaned up first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = final.parent / _staging_name(final, tag)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        make_readable(staging)
        if merge and final.is_dir():
            move_entries(staging, final)
            staging.rmdir()
        else:
            replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def scratch_dir(beside: str | Path, tag: str) -> Iterator[Path]:
    """A scratch folder `.<name>.<tag>-<pid>` beside `beside`, always removed afterwards (and, if this
    process is killed, by the next `staged_dir(beside)`)."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    scratch = beside.parent / _staging_name(beside, tag)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class JsonlError(ValueError):
    """A JSONL line that does not parse; the message is `file:line: reason`."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise JsonlError naming file:line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JsonlError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
