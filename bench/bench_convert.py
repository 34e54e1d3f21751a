#!/usr/bin/env python
"""Benchmark the Eevee v1 converter on a generated V3 corpus (>= 50,000 frames).

Prints windows/s for --workers 1 vs --workers 2 (and their ratio), measured side by side in this run,
and the peak RSS of a converter process for two corpus sizes (half and full) to show memory stays
flat in the corpus size. Each measurement runs in a fresh child process. The corpus (small PNGs,
session_data.json in the real V3 writer's shape from pokemon_gemma.demo) is generated once into
--corpus_dir and reused by later runs.

    python bench/bench_convert.py [--sessions 500] [--turns 100] [--repeats 2] [--corpus_dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from pokemon_gemma.demo import DEMO_BUTTONS, DemoSession, DemoTurn, session_json


def _pngs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (24, 16), tuple(rng.randrange(256) for _ in range(3)))
        img.putpixel((rng.randrange(24), rng.randrange(16)), (255, 255, 255))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def generate_corpus(root: Path, sessions: int, turns: int, seed: int = 0) -> Path:
    """root/full/runs (all sessions) and root/half/runs (symlinks to the first half); reused if complete."""
    marker = root / "corpus.json"
    spec = {"sessions": sessions, "turns": turns, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    runs, half = root / "full" / "runs", root / "half" / "runs"
    runs.mkdir(parents=True)
    half.mkdir(parents=True)
    pngs = _pngs(64, seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i in range(sessions):
        start = datetime(2025, 6, 27, 8, 0, 0) + timedelta(hours=i)
        demo_turns = []
        for t in range(1, turns + 1):
            b = rng.choice(DEMO_BUTTONS)
            demo_turns.append(
                DemoTurn(t, b, None, f"The path continues {b}.", f"Player on a path, turn {t}.", "navigation", None)
            )
        session = DemoSession(start.strftime("%Y%m%d_%H%M%S"), "explore the town", start, demo_turns)
        data, _ = session_json(session)
        d = runs / f"session_{session.session_id}"
        (d / "sshots").mkdir(parents=True)
        for t in range(1, turns + 1):
            (d / "sshots" / f"step_{t:04d}_grid.png").write_bytes(pngs[rng.randrange(len(pngs))])
        (d / "session_data.json").write_text(json.dumps(data, indent=2))
        if i < sessions // 2:
            (half / d.name).symlink_to(d)
    marker.write_text(json.dumps(spec))
    print(f"generated {sessions} sessions x {turns} frames in {time.perf_counter() - t0:.1f} s under {root}")
    return root


def child(args) -> int:
    """One conversion in this (fresh) process; prints a JSON line with time, windows and peak RSS."""
    from pokemon_gemma.convert import convert_corpus

    t0 = time.perf_counter()
    summary = convert_corpus(args.data, args.out, workers=args.workers, progress=False, warn=lambda _: None)
    elapsed = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "windows": summary["windows"]["produced"],
                "frames": summary["frames_checked"],
                "rss_mb": me.ru_maxrss / 1024,
                "child_rss_mb": kids.ru_maxrss / 1024,
                "cpu_main_s": me.ru_utime + me.ru_stime,
                "cpu_pool_s": kids.ru_utime + kids.ru_stime,
            }
        )
    )
    return 0


def measure(data: Path, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_convert_out_"))
    try:
        r = subprocess.run(
            [sys.executable, __file__, "--child", "--data", str(data), "--out", str(out), "--workers", str(workers)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise SystemExit(f"error: converter child failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500, help="sessions in the full corpus (default: 500)")
    parser.add_argument("--turns", type=int, default=100, help="frames (turns) per session (default: 100)")
    parser.add_argument(
        "--corpus_dir",
        default=str(Path(tempfile.gettempdir()) / "pokemon_gemma_bench_convert"),
        help="where the generated corpus is kept and reused",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per worker count; the best is shown (default: 2)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    root = generate_corpus(Path(args.corpus_dir), args.sessions, args.turns)
    n_full = args.sessions * args.turns
    n_half = (args.sessions // 2) * args.turns
    # alternate the two worker counts and keep each one's best run: the machine may be shared
    runs = {1: [], 2: []}
    for _ in range(args.repeats):
        for w in (1, 2):
            runs[w].append(measure(root / "full", w))
    w1, w2 = (min(runs[w], key=lambda m: m["elapsed_s"]) for w in (1, 2))
    half = measure(root / "half", 1)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="convert_eevee_data_v2 on a generated V3 corpus (each row a fresh process)")
    for col in (
        "corpus frames",
        "workers",
        "windows",
        "seconds",
        "windows/s",
        "CPU s (main / pool)",
        "peak RSS MB (main / pool)",
    ):
        table.add_column(col, justify="right")
    for n, w, m in ((n_full, 1, w1), (n_full, 2, w2), (n_half, 1, half)):
        table.add_row(
            f"{n:,}",
            str(w),
            f"{m['windows']:,}",
            f"{m['elapsed_s']:.1f}",
            f"{m['windows'] / m['elapsed_s']:,.0f}",
            f"{m['cpu_main_s']:.1f} / {m['cpu_pool_s']:.1f}",
            f"{m['rss_mb']:.0f} / {m['child_rss_mb']:.0f}",
        )
    Console().print(table)
    speed1, speed2 = w1["windows"] / w1["elapsed_s"], w2["windows"] / w2["elapsed_s"]
    print(
        f"workers 2 / workers 1 throughput ratio: {speed2 / speed1:.2f}x "
        f"({speed1:,.0f} vs {speed2:,.0f} windows/s, best of {args.repeats} alternating runs each; "
        f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"peak RSS, workers 1: {half['rss_mb']:.0f} MB at {n_half:,} frames vs {w1['rss_mb']:.0f} MB at "
        f"{n_full:,} frames (ratio {w1['rss_mb'] / half['rss_mb']:.2f} for 2x the frames)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
