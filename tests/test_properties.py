"""Property-based tests (hypothesis): the dataset readers and the search-space parser never fail
with anything but a clear CrystaltuneError, and never lose a record."""

from __future__ import annotations

import json

from conftest import rocksalt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crystaltune.errors import CrystaltuneError
from crystaltune.readers import read_source
from crystaltune.search.space import parse_space

GOOD = rocksalt().as_dict()
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=6), st.integers()), "band_gap": scalars},
        optional={"structure": st.one_of(st.just(GOOD), json_values)},
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, max_size=6))
def test_reader_accounts_for_every_line(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("h") / "d.jsonl"
    text = "\n".join(json.dumps(i) for i in items) + "\n"
    path.write_text(text)
    try:
        raw = read_source(path)
    except CrystaltuneError:
        return  # e.g. an empty or non-JSON-lines file: one clear error
    try:
        whole = json.loads(text)  # a one-line file may be a whole JSON document
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return  # a lone object is read as a document (a record, or {id: record}), not as lines
    expected = len(whole) if isinstance(whole, list) else len(items)
    assert len(raw.records) + len(raw.skipped) == expected
    assert all("reason" in s and "\n" not in s["reason"] for s in raw.skipped)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_reader_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "x.json"
    path.write_bytes(data)
    try:
        read_source(path)
    except CrystaltuneError:
        pass


param_specs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["categorical", "int", "float", "uniform", 3])},
        optional={
            "choices": json_values,
            "low": scalars,
            "high": scalars,
            "log": scalars,
            "step": scalars,
            "when": json_values,
        },
    ),
)
param_names = st.sampled_from(
    [
        "model.name",
        "optim.lr",
        "model.hidden",
        "loss.kl",
        "loss.kl_weight",
        "model.nope",
        "model.edge_params.num_rbf",
        "train.batch_size",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "dataset", "budget", "resources", "fixed", "search", "extra"]), json_values, max_size=4
    ),
    st.dictionaries(param_names, param_specs, max_size=4),
)
def test_space_parser_raises_only_clear_errors(top, search):
    raw = {**top, "search": search}
    try:
        space = parse_space(raw, "h.yaml")
    except CrystaltuneError as exc:
        assert str(exc).startswith("h.yaml") and "\n" not in str(exc)
        return
    assert space.params  # a space that parsed has parameters and builds valid trial configs
