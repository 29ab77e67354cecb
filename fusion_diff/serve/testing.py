"""Driving the page from outside, for its browser test and latency script: the server as a subprocess
(the real ``fusion-diff serve`` command) and Debian's Chromium through Playwright.

Playwright's own browser download needs the internet, so the system ``chromium`` package is used
through ``executable_path``. The flags switch off Chromium's own background traffic (component
updates, sync, field trials), which a closed network refuses and which would otherwise show up
among the page's requests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> Path | None:
    """The system Chromium: ``$FUSION_DIFF_CHROMIUM``, Debian's ``/usr/bin/chromium``, or ``chromium`` on PATH."""
    override = os.environ.get("FUSION_DIFF_CHROMIUM")
    candidates = [override] if override else [*CHROMIUM_CANDIDATES, shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def launch_chromium(playwright, executable: Path | None = None):
    """A headless Chromium ``Browser`` from a running ``sync_playwright()`` context."""
    executable = executable or find_chromium()
    if executable is None:
        raise RuntimeError(
            "No system Chromium found (/usr/bin/chromium). Install Debian's package: apt-get install -y chromium "
            "(Playwright's own browser download does not work offline), or set FUSION_DIFF_CHROMIUM."
        )
    return playwright.chromium.launch(executable_path=str(executable), args=list(CHROMIUM_ARGS))


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_subprocess(
    args: Sequence[str], timeout: float = 180.0, host: str = "127.0.0.1", cwd: str | os.PathLike | None = None
) -> Iterator[str]:
    """Run ``fusion-diff serve ARGS --host HOST --port <free>`` (in ``cwd``) and yield its URL once the page
    answers; the server is stopped on exit. Its output goes to a log whose tail is in any startup error."""
    port = free_port(host)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fusion-diff-serve-{port}.log"
    command = [sys.executable, "-m", "fusion_diff.cli", "serve", *args, "--host", host, "--port", str(port)]
    url = f"http://{host}:{port}/"
    with open(log_path, "w+", encoding="utf-8") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cwd is not None:  # the checkout stays importable from another working directory
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
            )
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = f"exited with {process.returncode}" if process.returncode is not None else "timed out"
                    raise RuntimeError(f"fusion-diff serve {state}; its output:\n{log.read()[-4000:]}")
                try:
                    with _DIRECT.open(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
