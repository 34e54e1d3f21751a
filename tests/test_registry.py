"""Model registry: concurrency, duplicates, rollback, integrity, lineage, W&B offline — real SQLite, real CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pokemon_gemma.registry import Registry, RegistryError
from tests.conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "scripts" / "model_registry.py")
SECRET = "wandb_SECRET_abcdef0123456789"


def cli(db, *args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, SCRIPT, "--registry_db", str(db), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def make_checkpoint(path, seed):
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    save_file({"w": torch.randn(8, 8)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_name_or_path": "tiny/base"}))
    return path


def test_eight_concurrent_processes_get_eight_distinct_versions(tmp_path):
    db = tmp_path / "reg.db"
    ckpts = [make_checkpoint(tmp_path / f"ck{i}", i) for i in range(8)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                SCRIPT,
                "--registry_db",
                str(db),
                "register",
                "--name",
                "race",
                "--checkpoint",
                str(c),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in ckpts
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outs]
    reported = sorted(json.loads(o[0])["version"] for o in outs)
    assert reported == list(range(1, 9))
    listed = json.loads(cli(db, "list", "--name", "race", "--json").stdout)
    assert sorted(v["version"] for v in listed) == list(range(1, 9))
    assert sorted(v["path"] for v in listed) == sorted(str(c.resolve()) for c in ckpts)
    assert len({v["sha256"] for v in listed}) == 8
    with Registry(db) as reg:
        assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reg.conn.execute("SELECT COUNT(*) FROM stage_history WHERE action='register'").fetchone()[0] == 8


def _register_many(db, ckpt, barrier, n, queue):
    barrier.wait()  # all processes hit the write path at the same moment
    with Registry(db) as reg:
        queue.put([reg.register("burst", ckpt, on_duplicate="allow")[0].version for _ in range(n)])


def test_eight_processes_released_together_lose_no_rows(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    db, ck = tmp_path / "reg.db", make_checkpoint(tmp_path / "ck", 0)
    Registry(db).close()
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(db, ck, barrier, 10, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    got = sorted(v for _ in procs for v in queue.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert got == list(range(1, 81))
    with Registry(db) as reg:
        assert [v.version for v in reg.list_versions("burst")] == list(range(1, 81))


def test_duplicate_weights_detected_reused_or_allowed(tmp_path):
    db, ck = tmp_path / "reg.db", make_checkpoint(tmp_path / "ck", 0)
    assert cli(db, "register", "--name", "m", "--checkpoint", str(ck)).returncode == 0
    copy = shutil.copytree(ck, tmp_path / "copy")  # same bytes elsewhere is still the same model
    dup = cli(db, "register", "--name", "m", "--checkpoint", str(copy))
    assert dup.returncode == 1 and "already registered as m:v1" in dup.stderr and "Traceback" not in dup.stderr
    reuse = json.loads(
        cli(db, "register", "--name", "m", "--checkpoint", str(copy), "--on_duplicate", "reuse", "--json").stdout
    )
    assert (reuse["version"], reuse["created"]) == (1, False)
    assert (
        json.loads(
            cli(db, "register", "--name", "m", "--checkpoint", str(copy), "--on_duplicate", "allow", "--json").stdout
        )["version"]
        == 2
    )
    # Another name may hold the same weights.
    assert cli(db, "register", "--name", "other", "--checkpoint", str(ck)).returncode == 0


def test_promote_and_rollback_walk_back_through_production_history(tmp_path):
    db = tmp_path / "reg.db"
    for i in range(3):
        assert (
            cli(db, "register", "--name", "m", "--checkpoint", str(make_checkpoint(tmp_path / f"c{i}", i))).returncode
            == 0
        )
        assert cli(db, "promote", "m", "--version", str(i + 1), "--stage", "production").returncode == 0

    def stages():
        return {v["version"]: v["stage"] for v in json.loads(cli(db, "list", "--json").stdout)}

    assert stages() == {1: "archived", 2: "archived", 3: "production"}
    out = cli(db, "rollback", "m")
    assert out.returncode == 0 and "production is now v2" in out.stdout
    assert stages() == {1: "archived", 2: "production", 3: "archived"}
    assert cli(db, "rollback", "m").returncode == 0
    assert stages()[1] == "production"
    last = cli(db, "rollback", "m")
    assert last.returncode == 1 and "no earlier production version" in last.stderr
    # Deleting production is refused; deleting an archived version removes only its row.
    assert cli(db, "delete", "m", "--version", "1").returncode == 1
    assert cli(db, "delete", "m", "--version", "2").returncode == 0
    assert sorted(stages()) == [1, 3]
    shown = json.loads(cli(db, "show", "m:1", "--json").stdout)
    assert [h["to_stage"] for h in shown["history"]] == ["none", "production", "archived", "production"]
    assert all(h["who"] and h["at"] for h in shown["history"])


def test_show_flags_files_that_no_longer_match(tmp_path):
    db, ck = tmp_path / "reg.db", make_checkpoint(tmp_path / "ck", 0)
    assert cli(db, "register", "--name", "m", "--checkpoint", str(ck)).returncode == 0
    ok = cli(db, "show", "m")
    assert ok.returncode == 0 and "integrity       ok" in ok.stdout
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = cli(db, "show", "m:1")
    assert bad.returncode == 1 and "MODIFIED: model.safetensors" in bad.stdout
    assert "no longer match the registered sha256" in bad.stderr
    assert json.loads(cli(db, "show", "m", "--json").stdout)["integrity"]["status"] == "modified"
    shutil.rmtree(ck)
    gone = json.loads(cli(db, "show", "m", "--json").stdout)["integrity"]
    assert gone["status"] == "missing"


def test_missing_or_empty_checkpoint_is_a_clear_error(tmp_path):
    db = tmp_path / "reg.db"
    out = cli(db, "register", "--name", "m", "--checkpoint", str(tmp_path / "moved"))
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "moved: checkpoint not found" in out.stderr
    (tmp_path / "empty").mkdir()
    out = cli(db, "register", "--name", "m", "--checkpoint", str(tmp_path / "empty"))
    assert out.returncode == 1 and "no weight files" in out.stderr and "Traceback" not in out.stderr
    out = cli(db, "show", "nothing")
    assert out.returncode == 1 and "no model named 'nothing'" in out.stderr
    assert cli(db, "show", "m:abc").returncode == 2
    assert json.loads(cli(db, "list", "--json").stdout) == []


def test_lineage_metrics_and_masked_training_config_from_a_real_adapter(tmp_path, tiny_model_dir):
    from pokemon_gemma.modeling import apply_lora, load_model

    run = tmp_path / "run"
    apply_lora(load_model(str(tiny_model_dir)), r=2, alpha=4).save_pretrained(run)
    data = tmp_path / "train.jsonl"
    data.write_text('{"x": 1}\n')
    (run / "run_config.json").write_text(json.dumps({"dataset_path": str(data), "lora_r": 2, "wandb_api_key": SECRET}))
    report = tmp_path / "eval_report.json"
    report.write_text(
        json.dumps(
            {"accuracy": 0.625, "n": 16, "per_button": {"A": 0.5}, "model_name": "x", "examples": [{"big": "list"}]}
        )
    )
    db = tmp_path / "reg.db"
    out = cli(db, "register", "--name", "m", "--checkpoint", str(run), "--metrics", str(report), "--tags", "run=t")
    assert out.returncode == 0, out.stderr
    v = json.loads(cli(db, "show", "m:1", "--json").stdout)
    import hashlib

    assert v["base_model"] == str(tiny_model_dir)
    assert v["dataset_path"] == str(data) and v["dataset_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert v["metrics"] == {"accuracy": 0.625, "n": 16, "per_button": {"A": 0.5}}
    assert v["training_config"]["lora_r"] == 2 and v["training_config"]["wandb_api_key"] == "***"
    assert sorted(v["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert v["tags"] == {"run": "t"}
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert v["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)  # the commit of this checkout
    assert SECRET not in db.read_bytes().decode("latin-1")
    exported = tmp_path / "export.json"
    assert cli(db, "export", "m", "--version", "1", "--output", str(exported)).returncode == 0
    assert json.loads(exported.read_text())["integrity"]["status"] == "ok"


@pytest.mark.slow  # W&B runs its own service process
def test_wandb_artifact_offline_and_unreachable_server_never_loses_the_version(tmp_path):
    db, ck = tmp_path / "reg.db", make_checkpoint(tmp_path / "ck", 0)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    out = cli(db, "register", "--name", "m", "--checkpoint", str(ck), "--wandb", env=env, cwd=tmp_path)
    assert out.returncode == 0 and "logged to W&B as model artifact m (offline)" in out.stdout, out.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    env = {
        **os.environ,
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_DIR": str(tmp_path),
    }
    ck2 = make_checkpoint(tmp_path / "ck2", 1)
    out = cli(db, "register", "--name", "m", "--checkpoint", str(ck2), "--wandb", env=env, cwd=tmp_path)
    assert out.returncode == 0 and "registered m:v2" in out.stdout and "W&B logging skipped" in out.stderr
    assert "x" * 40 not in out.stdout + out.stderr
    with Registry(db) as reg:
        assert [v.version for v in reg.list_versions("m")] == [1, 2]
        with pytest.raises(RegistryError, match="no version 7"):
            reg.get("m", 7)


# --------------------------------------------------------------------------- a damaged registry, a full disk


def _real_registry(db, tmp_path):
    with Registry(db) as reg:
        for i in range(3):
            reg.register("m", make_checkpoint(tmp_path / f"real{i}", i), tags={"pad": "x" * 3000})
    assert db.stat().st_size >= 4 * 4096  # several pages, so that cutting it loses some
    return db.read_bytes()


def _damage(kind, db, tmp_path):
    """Put a damaged registry of `kind` at `db`."""
    import random
    import sqlite3

    rng = random.Random(0)
    if kind == "garbage":
        db.write_bytes(rng.randbytes(8192))
    elif kind == "not_sqlite":
        db.write_text('{"versions": [{"name": "m", "version": 1}]}\n')
    elif kind == "zero_filled":
        db.write_bytes(b"\0" * 8192)
    elif kind == "directory":
        db.mkdir()
    elif kind == "truncated":
        data = _real_registry(tmp_path / "whole.db", tmp_path)
        db.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_pages":
        data = bytearray(_real_registry(tmp_path / "whole.db", tmp_path))
        data[4096:] = rng.randbytes(len(data) - 4096)  # the header page survives, the tables do not
        db.write_bytes(bytes(data))
    elif kind == "someone_elses_sqlite":
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users (email) VALUES ('a@example.com')")
        conn.commit()
        conn.close()


@pytest.mark.parametrize(
    "kind, words",
    [
        ("garbage", "not a SQLite registry"),
        ("not_sqlite", "not a SQLite registry"),
        ("zero_filled", "not a SQLite registry"),
        ("directory", "is a directory"),
        ("truncated", "damaged"),
        ("corrupt_pages", "damaged"),
        ("someone_elses_sqlite", "not a pokemon-gemma registry (no versions table; tables: users)"),
    ],
)
def test_damaged_registry_file_is_a_one_line_error_and_stays_untouched(tmp_path, kind, words):
    """list, show and register on a damaged registry: exit 1 with one line naming the file and what is
    wrong, no sqlite3 traceback, and the file (and its folder) exactly as they were."""
    folder = tmp_path / "store"
    folder.mkdir()
    db = folder / "registry.db"
    _damage(kind, db, tmp_path)
    before = {p.name: (p.read_bytes() if p.is_file() else "dir") for p in folder.iterdir()}
    ck = make_checkpoint(tmp_path / "ck", 9)
    for args in (["list"], ["show", "m"], ["register", "--name", "m", "--checkpoint", str(ck)]):
        out = cli(db, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and "Traceback" not in out.stderr, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: {db}: ") and words in lines[0], (args, lines)
        assert "restore it from a backup" in lines[0], lines
        after = {p.name: (p.read_bytes() if p.is_file() else "dir") for p in folder.iterdir()}
        assert after == before, f"{args}: the damaged registry or its folder changed"


def test_registry_on_a_full_disk_is_a_one_line_error_and_loses_nothing(tmp_path):
    from tests.helpers import fill_disk, small_tmpfs

    ck1, ck2 = make_checkpoint(tmp_path / "ck1", 1), make_checkpoint(tmp_path / "ck2", 2)
    with small_tmpfs(tmp_path / "disk", size_kb=512) as disk:
        db = disk / "registry.db"
        assert cli(db, "register", "--name", "m", "--checkpoint", str(ck1)).returncode == 0
        filler = fill_disk(disk, leave_bytes=0)
        out = cli(db, "register", "--name", "m", "--checkpoint", str(ck2))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert len(lines) == 1 and lines[0].startswith(f"error: {db}: ") and "full" in lines[0], lines
        assert "free disk space" in lines[0]
        filler.unlink()
        assert [v["version"] for v in json.loads(cli(db, "list", "--json").stdout)] == [1]
        assert cli(db, "register", "--name", "m", "--checkpoint", str(ck2)).returncode == 0


def test_promotion_verifies_the_files_first(tmp_path):
    """A version whose checkpoint folder was moved away (or whose weights changed) is not promoted to
    staging or production, nor rolled back to; archiving it is allowed."""
    db = tmp_path / "reg.db"
    ck1, ck2 = make_checkpoint(tmp_path / "ck1", 1), make_checkpoint(tmp_path / "ck2", 2)
    for ck in (ck1, ck2):
        assert cli(db, "register", "--name", "m", "--checkpoint", str(ck)).returncode == 0
    ck1.rename(tmp_path / "moved")
    for stage in ("production", "staging"):
        out = cli(db, "promote", "m", "--version", "1", "--stage", stage)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"m:v1: not moved to {stage}: its files at {ck1} are missing" in lines[0], lines
    with Registry(db) as reg:
        assert reg.get("m", 1).stage == "none" and len(reg.get("m", 1).history) == 1
    (tmp_path / "moved").rename(ck1)
    assert cli(db, "promote", "m", "--version", "1", "--stage", "production").returncode == 0
    assert cli(db, "promote", "m", "--version", "2", "--stage", "production").returncode == 0
    weights = ck1 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # v1's weights change after registration
    out = cli(db, "rollback", "m")
    assert out.returncode == 1 and "m:v1: not moved to production: its files at" in out.stderr
    assert "are modified (model.safetensors)" in out.stderr
    with Registry(db) as reg:
        assert reg.production("m").version == 2
    assert cli(db, "promote", "m", "--version", "1", "--stage", "archived").returncode == 0
