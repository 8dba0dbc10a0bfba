"""The `crystaltune` console script: its subcommands are the `python -m crystaltune.X` modules, with
their help, output and exit status, and its own help imports nothing heavy. Real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crystaltune import cli

SCRIPT = Path(sys.executable).with_name("crystaltune")
MODULES = {name: module.removesuffix(".__main__") for name, (module, _) in cli.COMMANDS.items()}
ENV = {**os.environ, "COLUMNS": "100"}  # argparse wraps help to the terminal: the same width for both forms


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def _script_installed():
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} missing: reinstall the package (pip install --no-deps -e .)")


def test_the_seven_entry_points_are_commands():
    assert list(MODULES) == ["search", "train", "predict", "report", "ensemble", "data", "bench"]
    assert MODULES["search"] == "crystaltune.search" and MODULES["predict"] == "crystaltune.predict"


def test_help_lists_every_command_with_a_one_line_description():
    out = run(str(SCRIPT), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: crystaltune ")
    lines = out.stdout.splitlines()
    for name in MODULES:
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        description = line.split(None, 1)[1]
        assert description == cli.summary(name) and len(description) > 10, line
        assert "``" not in description and "python -m" not in description, line
    # the descriptions are the modules' docstrings (less their usage), not text kept in two places
    assert cli.summary("data") == "inspect a dataset or build its graph cache"
    assert cli.summary("report") == "a Markdown report of a finished search, read from MLflow"


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import sys\n"
        "from crystaltune import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = ('torch', 'ray', 'mlflow', 'optuna', 'pymatgen', 'numpy')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]


def test_search_help_is_the_modules_help():
    with ThreadPoolExecutor(max_workers=2) as pool:  # each imports torch and Ray: overlap them
        ours = pool.submit(run, str(SCRIPT), "search", "--help")
        theirs = pool.submit(run, sys.executable, "-m", "crystaltune.search", "--help")
        ours, theirs = ours.result(), theirs.result()
    assert ours.returncode == theirs.returncode == 0, (ours.stderr[-2000:], theirs.stderr[-2000:])
    assert theirs.stdout.startswith("usage: python -m crystaltune.search ")
    assert ours.stdout == theirs.stdout


# One process per form runs all seven `--help`s, as the script and as `python -m` do (runpy), so
# torch and Ray are imported twice rather than fourteen times (about 8 s each on a loaded machine).
HELPS = """
import contextlib, io, json, runpy, sys
form, script, names = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
for name in names:
    sys.argv = [script, name, "--help"] if form == "script" else [name, "--help"]
    buf, code = io.StringIO(), None
    with contextlib.redirect_stdout(buf):
        try:
            if form == "script":
                runpy.run_path(script, run_name="__main__")
            else:
                runpy.run_module(name, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    out[name] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_each_commands_help_is_its_modules_help():
    def helps(form: str, names: list[str]) -> dict[str, list]:
        out = run(sys.executable, "-c", HELPS, form, str(SCRIPT), *names, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        ours = pool.submit(helps, "script", list(MODULES))
        theirs = pool.submit(helps, "module", list(MODULES.values()))
        ours, theirs = ours.result(), theirs.result()
    for name, module in MODULES.items():
        assert theirs[module][0] == ours[name][0] == 0, (name, ours[name], theirs[module])
        assert theirs[module][1].startswith(f"usage: python -m {module} "), theirs[module][1][:200]
        assert ours[name][1] == theirs[module][1], name


def test_a_near_miss_gets_did_you_mean_and_exit_2():
    out = run(str(SCRIPT), "serch", "perovskites")
    assert out.returncode == 2
    assert "did you mean 'search'" in out.stderr
    usage, error = out.stderr.splitlines()  # the usage and one error line
    assert usage.startswith("usage: crystaltune ") and error.startswith("crystaltune: error: unknown command 'serch'")
    assert out.stdout == ""
    far = run(str(SCRIPT), "xyzzy")
    assert far.returncode == 2 and "unknown command 'xyzzy'" in far.stderr and "did you mean" not in far.stderr


def test_no_command_prints_usage_and_exits_2():
    out = run(str(SCRIPT))
    assert out.returncode == 2
    assert out.stderr.startswith("usage: crystaltune ") and "error:" in out.stderr
    assert "search" in out.stderr  # says what the commands are


def test_user_errors_and_exit_status_are_the_modules():
    # argparse's error (no bench subcommand) and a CrystaltuneError (one `error:` line): both exit 2
    for args in (["bench"], ["bench", "train", "--epochs", "0"]):
        ours = run(str(SCRIPT), *args)
        theirs = run(sys.executable, "-m", "crystaltune.bench", *args[1:])
        assert ours.returncode == theirs.returncode == 2, (args, ours.stderr)
        assert ours.stderr == theirs.stderr and ours.stdout == theirs.stdout, args
    assert ours.stderr == "error: --epochs must be >= 1, got 0\n"


def test_data_info_runs_and_prints_what_the_module_prints():
    theirs = run(sys.executable, "-m", "crystaltune.data", "info", "perovskites")  # first: builds the cache
    ours = run(str(SCRIPT), "data", "info", "perovskites")
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout == theirs.stdout
    assert ours.stdout.startswith("perovskites: 1346 crystals")
