"""The speed suite runs end to end at small sizes and reports measured numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_all_quick_writes_the_readme_performance_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Performance\n\n<!-- crystaltune:performance -->\nold numbers\n"
        "<!-- /crystaltune:performance -->\n\n## Next\n"
    )
    # the reference code itself is the speed baseline where ../shared has it (tests never need ../shared)
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cgcnn" / "code"
    ref_args = ["--reference-code", str(ref)] if (ref / "main.py").is_file() else []
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crystaltune.bench",
            "all",
            "--quick",
            "--json",
            "--output",
            "bench.json",
            "--readme",
            str(readme),
            *ref_args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout[out.stdout.index("{") :])
    assert res["graphs"]["ratio"] > 5 and res["graphs"]["same_distances"]
    assert 0 < res["cache_load_perov5_s"] < 5
    for model, r in res["train"].items():
        assert r["graphs_per_s"] > 0 and r["peak_rss_mb"] > 0, model
    if ref_args:
        assert res["train"]["cgcnn"]["speedup_vs_reference_code"] > 1
        assert res["train"]["cgcnn"]["reference_code"]["train_crystals"] > 100
    assert (
        res["ddp"]["workers_1"]["graphs_per_s_last_epoch"] > 0
        and res["ddp"]["workers_2"]["graphs_per_s_last_epoch"] > 0
    )
    s = res["searches"][0]
    assert s["space"] == "smoke" and s["executor"] == "direct"
    assert s["trials"] >= 4 and 0 < s["training_s"] < s["wall_s"] and 0 <= s["overhead_fraction"] <= 1
    assert 0 < s["asha_epoch_fraction"] <= 1
    assert json.loads((tmp_path / "bench.json").read_text()) == res
    # the README section is generated from the measured numbers, between its markers, nothing else touched
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\n## Performance") and text.endswith("## Next\n")
    section = text.split("<!-- crystaltune:performance -->")[1].split("<!-- /crystaltune:performance -->")[0]
    assert f"**{res['graphs']['ratio']:.1f}x**" in section
    assert f"| `csgann` | {res['train']['csgann']['graphs_per_s']:.0f} |" in section
    assert f"{100 * s['overhead_fraction']:.1f}%" in section and res["versions"] in section
    # re-rendering from the saved JSON gives the same section
    again = subprocess.run(
        [sys.executable, "-m", "crystaltune.bench", "render", "bench.json", "--readme", str(readme)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and readme.read_text() == text


def test_readme_splice_appends_a_missing_section_and_rejects_a_missing_file(tmp_path):
    import pytest

    from crystaltune.errors import CrystaltuneError
    from crystaltune.readme import splice

    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    splice(readme, "results-a", "| a | 1 |")
    splice(readme, "results-a", "| a | 2 |")
    assert readme.read_text() == "# x\n\n<!-- crystaltune:results-a -->\n| a | 2 |\n<!-- /crystaltune:results-a -->\n"
    with pytest.raises(CrystaltuneError, match="no such file"):
        splice(tmp_path / "nope.md", "performance", "x")


def test_reference_code_batch_lines_are_read_as_graphs_per_epoch():
    """The reference's own per-batch lines (``--print-freq 1``): epoch -> (graphs, seconds); the last
    batch of an epoch holds what is left of its 80% training share."""
    from crystaltune.bench.reference_code import parse_batch_times

    log = "\n".join(
        [
            "Epoch: [0][0/3]\tTime 2.000 (2.000)\tData 1.9 (1.9)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Epoch: [0][1/3]\tTime 1.000 (1.500)\tData 0.9 (0.9)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Epoch: [0][2/3]\tTime 0.500 (1.167)\tData 0.4 (0.4)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Test: [0/1]\tTime 0.100 (0.100)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Epoch: [1][0/3]\tTime 0.100 (0.100)\tData 0.0 (0.0)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Epoch: [1][1/3]\tTime 0.100 (0.100)\tData 0.0 (0.0)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
            "Epoch: [1][2/3]\tTime 0.050 (0.083)\tData 0.0 (0.0)\tLoss 1.0 (1.0)\tMAE 1.0 (1.0)",
        ]
    )
    per_epoch = parse_batch_times(log, n_crystals=100, batch_size=32)  # 80 trained: 32 + 32 + 16
    assert per_epoch[0] == (80, 3.5)
    graphs, secs = per_epoch[1]
    assert graphs == 80 and abs(secs - 0.25) < 1e-9


def test_bench_gpu_quick_says_when_there_is_no_gpu(tmp_path):
    """On a machine without CUDA (CI), bench gpu runs, measures nothing it cannot, and says so in the
    JSON and in the README section it writes."""
    import torch

    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.bench", "gpu", "--quick", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{") :])
    if not torch.cuda.is_available():
        assert res["device"] is None and "not measured" in res["skipped"]
        assert "not measured on a GPU yet" in readme.read_text()
