"""Security: no unpickling of user files, no path traversal through names, secrets redacted,
services bound to loopback."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from crystaltune.checkpoint import load_checkpoint
from crystaltune.errors import CrystaltuneError
from crystaltune.outputs import redact

ROOT = Path(__file__).resolve().parents[1]


class Boom:
    def __reduce__(self):
        return (Path.write_text, (Path("/tmp/crystaltune-pwned"), "pwned"))


def test_pickled_payload_in_a_checkpoint_is_never_executed(tmp_path):
    import torch

    target = Path("/tmp/crystaltune-pwned")
    target.unlink(missing_ok=True)
    torch.save({"state_dict": {}, "normalizer": {}, "args": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(CrystaltuneError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CrystaltuneError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not target.exists()


def test_yaml_is_loaded_safely(tmp_path):
    from crystaltune.config import TrialConfig
    from crystaltune.search.space import load_space

    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['touch /tmp/crystaltune-yaml-pwned']\n")
    for loader in (TrialConfig.from_yaml, load_space):
        with pytest.raises(CrystaltuneError, match="not valid YAML"):
            loader(evil)
    assert not Path("/tmp/crystaltune-yaml-pwned").exists()


def test_secrets_in_uris_are_redacted():
    assert redact("s3://AKIAXXXX:s3cr3t@bucket/prefix") == "s3://***@bucket/prefix"
    assert redact("http://user:pw@host:5000") == "http://***@host:5000"
    assert redact("/plain/path") == "/plain/path"


def test_no_source_code_unpickles_or_loads_yaml_unsafely():
    offenders = []
    for f in (ROOT / "crystaltune").rglob("*.py"):
        text = f.read_text()
        if "weights_only=False" in text or "yaml.load(" in text or "pickle.load" in text or "allow_pickle=True" in text:
            offenders.append(str(f))
    assert not offenders


def test_ray_without_token_authentication_is_refused(monkeypatch):
    """crystaltune never starts or joins Ray with authentication switched off."""
    from crystaltune.errors import CrystaltuneError
    from crystaltune.raysession import init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(CrystaltuneError, match="RAY_AUTH_MODE='disabled'.*token authentication only"):
        init_ray(None, 1)
    with pytest.raises(CrystaltuneError, match="token authentication only"):
        init_ray("127.0.0.1:6379", 1)


def test_a_second_search_in_the_same_output_folder_is_refused(tmp_path):
    """While one search holds its output folder, another one aimed at it stops before touching its files."""
    import subprocess
    import sys

    from crystaltune.outputs import lock_output

    held = lock_output(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.search", "smoke", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "another search is writing there (pid" in out.stderr, out.stderr[-1000:]
    assert not (tmp_path / "ray").exists()
    held.close()  # released: the folder is free again
    lock_output(tmp_path).close()
