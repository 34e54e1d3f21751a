"""Small synthetic datasets for tests: the last frame's colour block says which button is right."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from pokemon_gemma.dataset import BUTTONS, QUESTION, make_output

COLOURS = [
    (230, 30, 30),
    (30, 200, 30),
    (30, 30, 230),
    (230, 230, 30),
    (230, 30, 230),
    (30, 230, 230),
    (250, 150, 0),
    (120, 120, 120),
]


def make_frame(path: Path, button_index: int, jitter: int) -> str:
    image = Image.new("RGB", (240, 160), (20 + jitter, 20, 20))
    ImageDraw.Draw(image).rectangle([60, 40, 180, 120], fill=COLOURS[button_index])
    image.save(path)
    return str(path)


def write_dataset(
    folder: Path,
    n: int,
    seed: int = 0,
    name: str = "train.jsonl",
    sessions: int = 4,
    context: str = "Goal: reach the door.",
) -> Path:
    """n records of 4 frames each; relative frame paths; label = colour of the last frame."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frames").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        labels = [rng.randrange(len(BUTTONS)) for _ in range(4)]
        frames = []
        for k, lab in enumerate(labels):
            fname = f"frames/{name.split('.')[0]}_{i}_{k}.png"
            make_frame(folder / fname, lab, rng.randrange(30))
            frames.append(fname)
        button = BUTTONS[labels[-1]]
        rows.append(
            {
                "frames": frames,
                "context": context,
                "question": QUESTION,
                "output": make_output(button, f"press {button}", "navigation", "test scene"),
                "metadata": {
                    "session_id": f"s{i % sessions}",
                    "turns": [i, i + 1, i + 2, i + 3],
                    "previous_buttons": [BUTTONS[x] for x in labels[:3]],
                    "scene_context": "navigation",
                },
            }
        )
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextmanager
def small_tmpfs(path: Path, size_kb: int = 512):
    """A real, small tmpfs mounted at `path` (a full disk on demand); skips where mounting is not allowed."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test ({mount.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system holding `folder` up to `leave_bytes` of free space."""
    import shutil

    filler = folder / ".filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 1-bit greyscale PNG of `width` x `height` black pixels: ~110 KB on disk for 30000x30000,
    900 M pixels decoded (PIL refuses it with DecompressionBombError). Written without ever holding
    the pixels: the rows are compressed a chunk at a time."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = bytearray()
    block = row * 1000
    for start in range(0, height, 1000):
        idat += packer.compress(block if start + 1000 <= height else row * (height - start))
    idat += packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))
    return path


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it, by pid (torchrun's workers outlive their launcher);
    only processes this test started are touched."""
    import psutil

    try:
        victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def run_tree(cmd, cwd, env, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run for `accelerate launch`: on a timeout (or a test interrupted) the launcher and all its
    workers are killed, not the launcher alone. Returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
