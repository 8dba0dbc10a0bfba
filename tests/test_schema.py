"""schema: dataclasses from YAML mappings, coercion by annotation, declared choices and ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from crystaltune.errors import CrystaltuneError
from crystaltune.schema import OutOfRange, UnknownKey, build, coerce, describe, option


@dataclass
class Opts:
    mode: Literal["fast", "slow"] = option("fast", doc="how to run")
    size: int = option(4, lo=1, hi=8, doc="how many")
    scale: float = option(1.0, lo=0, hi=2, open_lo=True)
    depth: int | None = option(None, lo=0, hi=3)
    tags: list[str] = option(default_factory=list)


def test_literal_choice_with_did_you_mean():
    assert build(Opts, {"mode": "slow"}, "opts").mode == "slow"
    with pytest.raises(
        CrystaltuneError, match=r"opts.mode: must be one of fast, slow, got 'slwo'; did you mean 'slow'\?"
    ):
        build(Opts, {"mode": "slwo"}, "opts")
    with pytest.raises(CrystaltuneError, match="opts.mode: must be one of fast, slow, got 1"):
        build(Opts, {"mode": 1}, "opts")


def test_range_error_names_the_key():
    with pytest.raises(OutOfRange, match=r"opts.size: must be in \[1, 8\], got 9") as info:
        build(Opts, {"size": 9}, "opts")
    assert info.value.where == "opts.size" and info.value.bounds == "[1, 8]"
    with pytest.raises(CrystaltuneError, match=r"opts.scale: must be in \(0, 2\], got 0.0"):
        build(Opts, {"scale": 0}, "opts")
    with pytest.raises(CrystaltuneError, match=r"opts.depth: must be in \[0, 3\] \(or null\), got -1"):
        build(Opts, {"depth": -1}, "opts")
    assert build(Opts, {"depth": None, "scale": 2}, "opts").scale == 2.0


def test_unknown_key_did_you_mean():
    with pytest.raises(UnknownKey, match=r"opts: unknown key 'sise'; did you mean 'size'\? \(known: mode, size"):
        build(Opts, {"sise": 3}, "opts")


def test_types_are_coerced_or_rejected():
    got = build(Opts, {"size": 3.0, "tags": ["a"]}, "opts")
    assert got.size == 3 and isinstance(got.size, int) and got.tags == ["a"]
    for raw, match in (
        ({"size": True}, "opts.size: expected an integer, got True"),
        ({"size": "3"}, "opts.size: expected an integer"),
        ({"tags": ["a", 2]}, r"opts.tags\[1\]: expected a string"),
        ({"depth": 1.5}, "opts.depth: expected an integer"),
    ):
        with pytest.raises(CrystaltuneError, match=match):
            build(Opts, raw, "opts")
    assert coerce(2, float, "x") == 2.0 and coerce(None, int | None, "x") is None


def test_an_instance_is_checked_again_and_none_gives_defaults():
    assert build(Opts, None, "opts") == Opts()
    with pytest.raises(CrystaltuneError, match="opts.mode: must be one of"):
        build(Opts, Opts(mode="other"), "opts")  # type: ignore[arg-type]


def test_describe_writes_the_option_list_from_the_fields():
    lines = describe(Opts)
    assert lines[0] == "``mode`` ('fast' | 'slow', default 'fast'): how to run"
    assert lines[1] == "``size`` (int in [1, 8], default 4): how many"
    assert lines[3] == "``depth`` (int in [0, 3] or null, default null)"


def test_model_docstrings_list_every_option():
    """The generated lists are complete, e.g. csginn's aggregations include 'sum'."""
    import dataclasses

    from crystaltune.featurizers import EDGE_FEATURIZERS
    from crystaltune.models import MODELS

    for registry in (MODELS, EDGE_FEATURIZERS):
        for name in registry.names():
            cls = registry.get(name)
            for f in dataclasses.fields(cls.Params):
                assert f"``{f.name}``" in cls.__doc__, (name, f.name)
    assert "'sum'" in MODELS.get("csginn").__doc__


def test_schema_is_a_leaf():
    """schema imports nothing from crystaltune but errors and registry (the config circle is one-way)."""
    import ast
    from pathlib import Path

    import crystaltune.schema as schema

    tree = ast.parse(Path(schema.__file__).read_text())
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert relative <= {"errors", "registry"}


def test_components_do_not_import_config():
    """Models, featurizers and losses parse their options through schema; config imports them, never
    the reverse."""
    import subprocess
    import sys

    code = (
        "import sys, crystaltune.models, crystaltune.featurizers, crystaltune.losses; "
        "print('crystaltune.config' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
