"""Model registry: versions of named models with lineage, metrics and stage history, in SQLite.

One row per (name, version). A version records where the weights are, a sha256 over the weight
files, their size, the eval metrics, the base model, the dataset (path + sha256), the training
config (secrets masked), the project's git commit and when it was created; every stage change
(none -> staging -> production -> archived) is appended to a history table with who and when.

Concurrency: the database is in WAL mode and every write runs in a `BEGIN IMMEDIATE`
transaction, so N processes registering at once get N distinct versions (the version number is
read and inserted under the same write lock) and readers never block writers.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pokemon_gemma.artifacts import find_base_model, find_run_config
from pokemon_gemma.config import mask_secrets
from pokemon_gemma.errors import first_line
from pokemon_gemma.fileio import atomic_write_json, file_sha256, now_iso

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("none", "staging", "production", "archived")
SERVED_STAGES = ("staging", "production")  # promotion to these re-hashes the files first
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz", ".pt", ".gguf")
# Files that define an adapter besides its weights: a changed adapter_config changes the model.
ADAPTER_FILES = ("adapter_config.json",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    files TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    metrics_path TEXT,
    base_model TEXT,
    dataset_path TEXT,
    dataset_sha256 TEXT,
    training_config TEXT,
    git_commit TEXT,
    tags TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'none',
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS versions_name_sha ON versions (name, sha256);
CREATE TABLE IF NOT EXISTS stage_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    from_stage TEXT,
    to_stage TEXT NOT NULL,
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    note TEXT
);
"""


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


SQLITE_MAGIC = b"SQLite format 3\x00"
COLUMNS = {  # what a registry file of ours has; a SQLite file without these tables is someone else's
    "versions": {"name", "version", "path", "sha256", "files", "size_bytes", "metrics", "tags", "stage"},
    "stage_history": {"name", "version", "from_stage", "to_stage", "who", "at", "action"},
}
UNUSABLE = "(restore it from a backup, or pass another --registry_db / REGISTRY_DB)"


def _db_errors(method):
    """SQLite errors of a registry call become one-line RegistryErrors naming the file."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    return wrapper


class DuplicateWeightsError(RegistryError):
    def __init__(self, message: str, existing: dict):
        super().__init__(message)
        self.existing = existing


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _disk_free(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 1 << 40


def current_user() -> str:
    try:
        return os.environ.get("REGISTRY_USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# --------------------------------------------------------------------------- checkpoint facts


def weight_files(checkpoint: Path) -> list[Path]:
    """The files whose bytes define the model: weights (top level) and adapter definitions."""
    if checkpoint.is_file():
        return [checkpoint]
    found = [
        p
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in ADAPTER_FILES)
    ]
    return found


def hash_checkpoint(checkpoint: Path) -> tuple[str, dict[str, str], int]:
    """(combined sha256, {relative file: sha256}, total bytes) over the weight files."""
    files = weight_files(checkpoint)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise RegistryError(
            f"{checkpoint}: no weight files (*.safetensors, *.bin, *.npz, adapter files) "
            "(point --checkpoint at a trained run, merged or MLX folder)"
        )
    per_file: dict[str, str] = {}
    size = 0
    for p in files:
        rel = p.name
        per_file[rel] = file_sha256(p)
        size += p.stat().st_size
    combined = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(per_file.items())).encode()).hexdigest()
    return combined, per_file, size


def dataset_facts(run_config: dict | None, run_config_path: Path | None) -> tuple[str | None, str | None]:
    """(dataset path, sha256) from a run config: a recorded sha wins, else the file is hashed if present."""
    if not run_config:
        return None, None
    path = run_config.get("dataset_path") or (run_config.get("settings") or {}).get("dataset_path")
    dataset = run_config.get("dataset")
    sha = run_config.get("dataset_sha256") or (dataset.get("sha256") if isinstance(dataset, dict) else None)
    if path and not sha:
        for candidate in (Path(path), (run_config_path.parent / path) if run_config_path else None):
            if candidate is not None and candidate.is_file():
                sha = file_sha256(candidate)
                break
    return (str(path) if path else None), sha


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_metrics(path: Path) -> dict[str, Any]:
    """Numeric metrics of an eval report (top-level numbers, and dicts of numbers such as per-button scores);
    descriptive strings and per-example lists stay in the report file (metrics_path)."""
    if not path.is_file():
        raise RegistryError(f"{path}: metrics file not found (pass the eval_report.json written by evaluate.py)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RegistryError(f"{path}:{getattr(exc, 'lineno', 1)}: invalid JSON ({exc}) (re-run evaluate.py)") from None
    if not isinstance(report, dict):
        raise RegistryError(f"{path}:1: expected a JSON object with metrics such as 'accuracy'")
    metrics: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            metrics[key] = value
    return metrics


def parse_tags(items: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"tag {item!r} is not key=value (write e.g. --tags run=demo)")
        tags[key] = value
    return tags


# --------------------------------------------------------------------------- the registry


@dataclass
class Version:
    name: str
    version: int
    path: str
    sha256: str
    files: dict[str, str]
    size_bytes: int
    metrics: dict[str, Any]
    metrics_path: str | None
    base_model: str | None
    dataset_path: str | None
    dataset_sha256: str | None
    training_config: dict | None
    git_commit: str | None
    tags: dict[str, str]
    stage: str
    created_at: str
    created_by: str
    history: list[dict] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("name", "version", "stage", "path", "sha256", "metrics", "size_bytes", "base_model", "created_at")
        }


def _row_to_version(row: sqlite3.Row) -> Version:
    d = dict(row)
    d.pop("id", None)
    for key in ("files", "metrics", "tags"):
        d[key] = json.loads(d[key])
    d["training_config"] = json.loads(d["training_config"]) if d["training_config"] else None
    return Version(**d)


class Registry:
    """Opening checks the file before SQLite writes to it: not a SQLite file, someone else's database,
    or a damaged one (`PRAGMA quick_check`) is a RegistryError naming the file, and the file is left
    exactly as it was. Every later SQLite error (a full disk, a file damaged meanwhile) is one too."""

    def __init__(self, db_path: str | Path, timeout_s: float = 60.0):
        self.db_path = Path(db_path)
        self._check_file()
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.db_path), timeout=timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"{self.db_path}: cannot open the registry ({_reason(exc)})") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self._init_db()
        except BaseException:
            self.conn.close()
            raise

    def _error(self, exc: BaseException) -> RegistryError:
        text = _reason(exc)
        if "full" in text or ("I/O" in text and _disk_free(self.db_path) < 1 << 20):  # WAL writes report I/O
            return RegistryError(f"{self.db_path}: {text} (free disk space; the registry is unchanged)")
        if "locked" in text or "busy" in text:
            return RegistryError(f"{self.db_path}: {text} (another process holds the registry; retry)")
        return RegistryError(f"{self.db_path}: the registry is unusable ({text}) {UNUSABLE}")

    def _check_file(self) -> None:
        """A file that is not SQLite is refused before SQLite touches it (a directory, text, garbage)."""
        path = self.db_path
        if path.is_dir():
            raise RegistryError(f"{path}: is a directory, not a registry file {UNUSABLE}")
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return  # a new registry
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read the registry ({_reason(exc)})") from None
        if head and head != SQLITE_MAGIC:
            raise RegistryError(f"{path}: not a SQLite registry (the file starts with {head[:8]!r}) {UNUSABLE}")

    def _init_db(self) -> None:
        # Switching to WAL needs a moment of exclusive access: retry while other processes hold it.
        for attempt in range(50):
            try:
                self._check_contents()
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                with self.transaction():
                    for stmt in SCHEMA.strip().split(";"):
                        if stmt.strip():
                            self.conn.execute(stmt)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise self._error(exc) from None
                time.sleep(0.05 * (attempt + 1))
            except sqlite3.Error as exc:  # DatabaseError: "file is not a database", "malformed"
                raise self._error(exc) from None
        raise RegistryError(f"{self.db_path}: database stayed locked (another process holds it)")

    def _check_contents(self) -> None:
        """Damage (quick_check) and someone else's schema are refused before anything is written."""
        problems = [r[0] for r in self.conn.execute("PRAGMA quick_check(3)").fetchall()]
        if problems != ["ok"]:
            found = " ".join("; ".join(problems).replace("*", " ").split())[:200]
            raise RegistryError(f"{self.db_path}: the registry is damaged ({found}) {UNUSABLE}")
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables.discard("sqlite_sequence")
        if not tables:
            return  # a new, empty database: the schema is created
        for table, needed in COLUMNS.items():
            have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            if not needed <= have:
                what = f"table {table} lacks {', '.join(sorted(needed - have))}" if have else f"no {table} table"
                raise RegistryError(
                    f"{self.db_path}: not a pokemon-gemma registry ({what}; tables: {', '.join(sorted(tables))}) "
                    f"{UNUSABLE}"
                )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no lost updates, no upgrade deadlock)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ----------------------------------------------------------------- reads
    def _history(self, name: str, version: int) -> list[dict]:
        rows = self.conn.execute(
            "SELECT from_stage, to_stage, who, at, action, note FROM stage_history "
            "WHERE name=? AND version=? ORDER BY id",
            (name, version),
        ).fetchall()
        return [dict(r) for r in rows]

    @_db_errors
    def list_versions(self, name: str | None = None) -> list[Version]:
        if name:
            rows = self.conn.execute("SELECT * FROM versions WHERE name=? ORDER BY version", (name,)).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
        return [_row_to_version(r) for r in rows]

    @_db_errors
    def names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    @_db_errors
    def get(self, name: str, version: int | None = None) -> Version:
        if version is None:
            row = self.conn.execute(
                "SELECT * FROM versions WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
        else:
            row = self.conn.execute("SELECT * FROM versions WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            known = ", ".join(str(v.version) for v in self.list_versions(name))
            if not known:
                raise RegistryError(
                    f"no model named {name!r} in {self.db_path} (registered: {', '.join(self.names()) or 'none'})"
                )
            raise RegistryError(f"{name} has no version {version} (versions: {known})")
        v = _row_to_version(row)
        v.history = self._history(v.name, v.version)
        return v

    @_db_errors
    def production(self, name: str) -> Version | None:
        row = self.conn.execute("SELECT * FROM versions WHERE name=? AND stage='production'", (name,)).fetchone()
        return _row_to_version(row) if row else None

    def _require_intact(self, v: Version, stage: str) -> None:
        """A version goes to staging or production only with the very files that were registered."""
        integrity = self.verify(v)
        if integrity["status"] != "ok":
            bad = ", ".join(integrity["changed"] + [f"{m} (missing)" for m in integrity["missing"]])
            raise RegistryError(
                f"{v.ref}: not moved to {stage}: its files at {v.path} are {integrity['status']} "
                f"({bad or integrity.get('detail', '')}) (restore them, or register the current files as a new version)"
            )

    def verify(self, v: Version) -> dict[str, Any]:
        """Re-hash the version's files: {'status': ok|modified|missing, 'changed': [...], 'missing': [...]}."""
        path = Path(v.path)
        missing, changed = [], []
        if not path.exists():
            return {"status": "missing", "changed": [], "missing": sorted(v.files), "detail": f"{path} does not exist"}
        base = path if path.is_dir() else path.parent
        for rel, sha in sorted(v.files.items()):
            f = path if path.is_file() else base / rel
            if not f.is_file():
                missing.append(rel)
            elif file_sha256(f) != sha:
                changed.append(rel)
        current = {p.name for p in weight_files(path)} if path.is_dir() else set()
        added = sorted(current - set(v.files))
        status = "missing" if missing else "modified" if changed or added else "ok"
        return {"status": status, "changed": changed + [f"{a} (new)" for a in added], "missing": missing}

    # ----------------------------------------------------------------- writes
    @_db_errors
    def register(
        self,
        name: str,
        checkpoint: str | Path,
        *,
        metrics_path: str | Path | None = None,
        tags: dict[str, str] | None = None,
        base_model: str | None = None,
        on_duplicate: str = "error",
        who: str | None = None,
    ) -> tuple[Version, bool]:
        """Add a version; returns (version, created). on_duplicate: error | reuse | allow."""
        if not name or ":" in name:
            raise RegistryError(f"model name {name!r} is empty or contains ':' (use e.g. pokemon-gemma)")
        ckpt = Path(checkpoint)
        if not ckpt.exists():
            raise RegistryError(
                f"{ckpt}: checkpoint not found (was it moved or deleted? pass the folder "
                "with the adapter or model weights)"
            )
        ckpt = ckpt.resolve()
        # Hash and read lineage before taking the write lock: this is the slow part.
        sha, files, size = hash_checkpoint(ckpt)
        metrics = load_metrics(Path(metrics_path)) if metrics_path else {}
        run_config, run_config_path = find_run_config(ckpt)
        dataset_path, dataset_sha = dataset_facts(run_config, run_config_path)
        record = dict(
            name=name,
            path=str(ckpt),
            sha256=sha,
            files=json.dumps(files),
            size_bytes=size,
            metrics=json.dumps(metrics),
            metrics_path=str(Path(metrics_path).resolve()) if metrics_path else None,
            base_model=base_model or find_base_model(ckpt),
            dataset_path=dataset_path,
            dataset_sha256=dataset_sha,
            training_config=json.dumps(mask_secrets(run_config)) if run_config is not None else None,
            git_commit=git_commit(),
            tags=json.dumps(tags or {}),
            stage="none",
            created_at=now_iso(),
            created_by=who or current_user(),
        )
        with self.transaction() as conn:
            dup = conn.execute(
                "SELECT * FROM versions WHERE name=? AND sha256=? ORDER BY version LIMIT 1", (name, sha)
            ).fetchone()
            if dup is not None and on_duplicate != "allow":
                existing = _row_to_version(dup)
                if on_duplicate == "reuse":
                    return existing, False
                raise DuplicateWeightsError(
                    f"{ckpt}: these weights are already registered as {existing.ref} (sha256 {sha[:12]}; "
                    "pass --on_duplicate allow to register them again)",
                    existing.summary(),
                )
            record["version"] = conn.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name=?", (name,)
            ).fetchone()[0]
            cols = ", ".join(record)
            conn.execute(
                f"INSERT INTO versions ({cols}) VALUES ({', '.join('?' * len(record))})", tuple(record.values())
            )
            conn.execute(
                "INSERT INTO stage_history (name, version, from_stage, to_stage, who, at, action, note) "
                "VALUES (?, ?, NULL, 'none', ?, ?, 'register', 'registered')",
                (name, record["version"], record["created_by"], record["created_at"]),
            )
        return self.get(name, record["version"]), True

    def _set_stage(self, conn, v: Version, stage: str, who: str, action: str, note: str) -> None:
        conn.execute("UPDATE versions SET stage=? WHERE name=? AND version=?", (stage, v.name, v.version))
        conn.execute(
            "INSERT INTO stage_history (name, version, from_stage, to_stage, who, at, action, note) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.version, v.stage, stage, who, now_iso(), action, note),
        )

    def _production_stack(self, name: str) -> list[int]:
        """Versions that were production, oldest first, as promotions push and rollbacks pop them."""
        stack: list[int] = []
        for version, action in self.conn.execute(
            "SELECT version, action FROM stage_history WHERE name=? AND to_stage='production' ORDER BY id", (name,)
        ):
            if action == "rollback":
                while stack and stack[-1] != version:
                    stack.pop()
                if not stack:
                    stack.append(version)
            else:
                if stack and stack[-1] == version:
                    continue
                stack.append(version)
        return stack

    @_db_errors
    def promote(self, name: str, version: int, stage: str, who: str | None = None, note: str = "promoted") -> Version:
        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        who = who or current_user()
        if stage in SERVED_STAGES:  # hashed before the write lock: the slow part
            self._require_intact(self.get(name, version), stage)
        with self.transaction() as conn:
            v = self.get(name, version)
            if stage == "production":
                # One production version per name: the previous one is archived (rollback can return to it).
                for row in conn.execute(
                    "SELECT * FROM versions WHERE name=? AND stage='production' AND version!=?", (name, version)
                ).fetchall():
                    self._set_stage(conn, _row_to_version(row), "archived", who, "archive", f"replaced by v{version}")
            if v.stage != stage:
                self._set_stage(conn, v, stage, who, "promote", note)
        return self.get(name, version)

    @_db_errors
    def rollback(self, name: str, who: str | None = None) -> tuple[Version, Version]:
        """Production goes back to the version that was in production before the current one."""
        who = who or current_user()
        with self.transaction() as conn:
            current = self.production(name)
            if current is None:
                self.get(name)  # raises a clear error for an unknown name
                raise RegistryError(f"{name} has no production version to roll back from")
            stack = self._production_stack(name)
            existing = {v.version for v in self.list_versions(name)}
            earlier = stack[:-1] if stack and stack[-1] == current.version else stack
            previous = next((ver for ver in reversed(earlier) if ver in existing and ver != current.version), None)
            if previous is None:
                raise RegistryError(
                    f"{name}: no earlier production version to roll back to "
                    f"(v{current.version} is the first one promoted)"
                )
            prev = self.get(name, previous)
            self._require_intact(prev, "production")
            self._set_stage(conn, current, "archived", who, "archive", f"rolled back to v{previous}")
            self._set_stage(conn, prev, "production", who, "rollback", f"rollback from v{current.version}")
        return self.get(name, current.version), self.get(name, previous)

    @_db_errors
    def delete(self, name: str, version: int, who: str | None = None) -> Version:
        with self.transaction() as conn:
            v = self.get(name, version)
            if v.stage == "production":
                raise RegistryError(f"{v.ref} is in production; promote another version or roll back first")
            conn.execute("DELETE FROM versions WHERE name=? AND version=?", (name, version))
            conn.execute(
                "INSERT INTO stage_history (name, version, from_stage, to_stage, who, at, action, note) "
                "VALUES (?, ?, ?, 'deleted', ?, ?, 'delete', 'deleted')",
                (name, version, v.stage, who or current_user(), now_iso()),
            )
        return v

    @_db_errors
    def export(self, name: str, version: int, output: str | Path) -> Path:
        v = self.get(name, version)
        doc = v.to_dict()
        doc["integrity"] = self.verify(v)
        doc["registry_db"] = str(self.db_path.resolve())
        doc["exported_at"] = now_iso()
        return atomic_write_json(output, mask_secrets(doc))


# --------------------------------------------------------------------------- W&B


def log_to_wandb(
    v: Version, *, project: str, entity: str | None = None, mode: str | None = None, api_key: str | None = None
) -> str | None:
    """Log a version as a W&B model artifact (weights by reference); a warning, never a crash, if W&B fails."""
    try:
        import wandb

        if api_key:
            os.environ.setdefault("WANDB_API_KEY", api_key)
        # WANDB_INIT_TIMEOUT (seconds) bounds the wait for an unreachable server.
        settings = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)), silent=True)
        run = wandb.init(
            project=project,
            entity=entity or None,
            mode=mode or None,
            job_type="register-model",
            name=f"register-{v.name}-v{v.version}",
            settings=settings,
            reinit="finish_previous",
        )
        try:
            art = wandb.Artifact(
                name=_artifact_name(v.name),
                type="model",
                metadata=mask_secrets({k: val for k, val in v.to_dict().items() if k != "history"}),
            )
            base = Path(v.path)
            for rel in v.files:
                f = base if base.is_file() else base / rel
                art.add_reference(f.resolve().as_uri(), name=rel, checksum=True)
            run.log_artifact(art, aliases=[f"v{v.version}-registry", v.stage if v.stage != "none" else "registered"])
        finally:
            run.finish()
        return f"{_artifact_name(v.name)} ({mode or os.environ.get('WANDB_MODE') or 'online'})"
    except Exception as exc:  # W&B is optional: unreachable servers or bad keys must not lose the registration
        first = first_line(exc)
        log.warning("W&B logging skipped: %s", first)
        return None


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
