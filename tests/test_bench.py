"""The speed suite runs end to end at small sizes and reports measured numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_all_quick_writes_the_readme_performance_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- crystaltune:performance -->\nold numbers\n<!-- /crystaltune:performance -->\n\n## Next\n")
    out = subprocess.run([sys.executable, "-m", "crystaltune.bench", "all", "--quick", "--json", "--output", "bench.json",
                          "--readme", str(readme)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    assert res["graphs"]["ratio"] > 5 and res["graphs"]["same_distances"]
    assert 0 < res["cache_load_perov5_s"] < 5
    for model, r in res["train"].items():
        assert r["graphs_per_s"] > 0 and r["peak_rss_mb"] > 0, model
    assert res["train"]["cgcnn"]["speedup_vs_reference"] > 1
    assert res["ddp"]["workers_1"]["graphs_per_s_last_epoch"] > 0 and res["ddp"]["workers_2"]["graphs_per_s_last_epoch"] > 0
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
    again = subprocess.run([sys.executable, "-m", "crystaltune.bench", "render", "bench.json", "--readme", str(readme)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
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
