"""cluster.yaml passes Ray's own validation offline (the cluster itself, on Ray's fake autoscaling
cluster: tests/test_autoscaling.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_offline():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    gpus = sorted(t["resources"].get("GPU", 0) for t in types.values())
    assert gpus == [0, 1, 4] and config["provider"]["type"] == "aws"
    text = (ROOT / "cluster.yaml").read_text()
    assert "constraints.txt" in text and "--dashboard-host=127.0.0.1" in text and "--host 127.0.0.1" in text
    assert "0.0.0.0 " not in text.replace("0.0.0.0/0", "")  # nothing but SSH faces the internet
    # token auth on every node, the token shipped to each of them
    assert "RAY_AUTH_MODE=disabled" not in text
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in c
    )
    assert "~/.ray/auth_token" in config["file_mounts"]
    perms = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
