"""The build: an SPDX license with its files, and no deprecation warning from the project's own
packaging (setuptools' `license = {text = ...}` form stops building on 2027-02-18)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").rglob("*.yaml"))


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
    spaces = {n for n in names if n.startswith("crystaltune/search/spaces/")}
    shipped = {f"crystaltune/search/spaces/{p.relative_to(ROOT / 'search_spaces')}" for p in SPACES}
    assert shipped and shipped == spaces, shipped ^ spaces


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


@pytest.mark.slow  # builds and installs a wheel into a fresh venv (45 s)
def test_an_installed_wheel_runs_a_built_in_space_outside_the_checkout(tmp_path):
    """The wheel alone in a new venv (its dependencies seen through a path to this venv's packages,
    where crystaltune's editable hook is not run), started outside the checkout: the smoke space runs."""
    import site
    import venv

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)])
    assert out.returncode == 0
    (wheel,) = tmp_path.glob("crystaltune-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)  # what pip install --no-deps puts there
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [py, "-c", "import crystaltune; print(crystaltune.__file__)"], cwd=work, capture_output=True, text=True
    )
    assert where.stdout.startswith(purelib), where.stdout + where.stderr
    run = subprocess.run(
        [py, "-m", "crystaltune.search", "smoke", "--num-samples", "2", "--max-epochs", "1", "--output", "out"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "out" / "leaderboard.csv").is_file()
