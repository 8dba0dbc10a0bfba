"""The build: an SPDX license with its files, and no deprecation warning from the project's own
packaging (setuptools' `license = {text = ...}` form stops building on 2027-02-18)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_deprecation_warnings_and_carries_its_licenses(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "deprecat" not in log.lower(), [line for line in log.splitlines() if "eprecat" in line][:5]
    (wheel,) = tmp_path.glob("crystaltune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert any(n.endswith("licenses/crystaltune/featurizers/data/LICENSE-cgcnn") for n in names)


def test_the_editable_install_make_install_does_prints_no_notice(tmp_path):
    """`make install` installs the project editable: its build prints no setuptools warning or notice
    (a flat layout made setuptools emit an 'Editable installation' notice on every install)."""
    code = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    noisy = [line for line in log.splitlines() if "warn" in line.lower() or line.strip() == "!!"]
    assert not noisy, noisy[:5]
    assert list(tmp_path.glob("crystaltune-*.editable-*.whl"))
