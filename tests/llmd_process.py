"""Starting the built `llmd` binary from the Python tests: `start(args)` runs `llmd <args>`,
keeps draining its log (so it never blocks on a full pipe), reads the address it logs, and
returns once `/health` answers 200."""

import collections
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = os.environ.get("LLMD_BIN", str(ROOT / "target/debug/llmd"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args):
    """Starts `llmd <args>`; returns (process, http base) once /health answers 200."""
    proc = subprocess.Popen(
        [BIN, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info"},
    )
    found = {}
    ready = threading.Event()
    tail = collections.deque(maxlen=20)

    def drain():
        for line in proc.stderr:
            tail.append(line)
            m = re.search(r"addr=(\S+)", line)
            if m and "addr" not in found:
                found["addr"] = m.group(1)
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    assert ready.wait(60), f"llmd {args[0]} logged no address"
    base = f"http://{found['addr']}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        # A worker that failed to load (its error is on its stderr) is not waited for.
        if proc.poll() is not None:
            time.sleep(0.2)  # the rest of its stderr
            raise AssertionError(f"llmd {args[0]} exited with {proc.returncode}:\n{''.join(tail)}")
        assert time.time() < deadline, f"llmd {args[0]} not ready"
        time.sleep(0.05)
    return proc, base
