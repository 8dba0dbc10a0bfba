"""A real browser for the review tests: Debian's headless Chromium renders a page (its JavaScript
run) and the test reads the text a user would see; servers are started on 127.0.0.1 only."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def serving(cmd: list[str], url: str, cwd, timeout_s: float = 90.0):
    """Run a web server in ``cwd`` until ``url`` answers 200; stop it on leaving."""
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(
                    f"{cmd[0]} never served {url}: {proc.stderr.read()[-2000:] if proc.poll() else ''}"
                )
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def page_text(url: str, budget_ms: int = 20000) -> str:
    """The page's visible text after its scripts ran (Chromium's virtual time: ``budget_ms``)."""
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", dom))
