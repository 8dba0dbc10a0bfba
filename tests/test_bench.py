"""The speed suite runs end to end at small sizes and reports measured numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_all_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "crystaltune.bench", "all", "--quick", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    assert res["graphs"]["ratio"] > 5 and res["graphs"]["same_distances"]
    assert 0 < res["cache_load_perov5_s"] < 5
    for model, r in res["train"].items():
        assert r["graphs_per_s"] > 0 and r["peak_rss_mb"] > 0, model
    assert res["train"]["cgcnn"]["speedup_vs_reference"] > 1
    assert res["ddp"]["workers_1"]["graphs_per_s_last_epoch"] > 0 and res["ddp"]["workers_2"]["graphs_per_s_last_epoch"] > 0
    s = res["search"]
    assert s["trials"] >= 4 and 0 < s["training_s"] < s["wall_s"] and 0 <= s["overhead_fraction"] <= 1
    assert 0 < s["asha_epoch_fraction"] <= 1
