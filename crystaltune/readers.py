"""Readers: dataset files (JSON lines, JSON lists, SNUMAT, CIF folders) -> raw records.

A raw record is a plain dict ``{"id", "line", "structure", "props"}`` where ``structure`` is still
unparsed (a pymatgen dict or a CIF/POSCAR string) so parsing can run in parallel workers. Problems
with one record become ``{"id", "reason"}`` entries in ``skipped``; problems with the file itself
raise :class:`CrystaltuneError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CrystaltuneError

STRUCTURE_KEYS = ("structure", "crystal_structure", "Structure_rlx")
ID_KEYS = ("id", "material_id", "SNUMAT_id")
#: SNUMAT's own column names, mapped to the names crystaltune uses.
ALIASES = {"Band_gap_HSE": "band_gap", "Band_gap_GGA": "band_gap_gga"}

FORMATS_HELP = (
    "JSON lines (.jsonl/.jsonl.gz, one record per line), a JSON list of records (.json/.json.gz), "
    "SNUMAT JSON (SNUMAT_id, Band_gap_HSE, Structure_rlx) as a list or one file per material in a "
    "folder, or a folder of CIF files with id_prop.csv"
)


@dataclass
class RawDataset:
    """Records read from one source, before structures are parsed."""

    source: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def check_source(path: Path) -> None:
    """Raise a one-line error when a dataset path does not exist."""
    if not path.exists():
        raise CrystaltuneError(f"{path}: no such file or folder (formats: {FORMATS_HELP})")


def read_source(path: str | Path) -> RawDataset:
    """Read a file or folder in any supported format; raise a one-line error if it is unusable."""
    path = Path(path)
    check_source(path)
    if path.is_dir():
        if (path / "id_prop.csv").exists():
            return _read_cif_folder(path)
        files = sorted(p for p in path.iterdir() if p.suffix == ".json" or p.name.endswith(".json.gz"))
        if files:
            return _read_json_folder(path, files)
        raise CrystaltuneError(f"{path}: folder has neither id_prop.csv nor *.json files ({FORMATS_HELP})")
    text = _read_text(path)
    if not text.strip():
        raise CrystaltuneError(f"{path}: file is empty")
    out = RawDataset(path)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and _is_single_json(stripped)):
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or a number too long to convert
            raise CrystaltuneError(f"{path}: not valid JSON ({_json_problem(exc)})") from None
        items = _top_level_records(path, data)
        if not items:
            raise CrystaltuneError(f"{path}: the JSON list holds no records")
        for i, item in enumerate(items, start=1):
            _add(out, item, line=i, where=f"record {i}")
            _check_count(path, out)
        return out
    if not stripped.startswith("{"):
        raise CrystaltuneError(f"{path}: not JSON or JSON lines (expected {FORMATS_HELP})")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            out.skipped.append(
                {"id": f"line {lineno}", "reason": f"line {lineno}: not valid JSON ({_json_problem(exc)})"}
            )
            continue
        _add(out, item, line=lineno, where=f"line {lineno}")
        _check_count(path, out)
    return out


def limit(name: str) -> int:
    """Reading budgets, raised with CRYSTALTUNE_MAX_RECORDS / CRYSTALTUNE_MAX_BYTES (or --max-records)."""
    return int(os.environ.get(f"CRYSTALTUNE_MAX_{name.upper()}", LIMITS[name]))


LIMITS = {"records": 1_000_000, "bytes": 4 << 30}  # per dataset file (bytes: after decompression)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes() if path.stat().st_size <= limit("bytes") else None
    except OSError as exc:
        raise CrystaltuneError(f"{path}: cannot read ({exc.strerror})") from None
    if raw is None:
        raise CrystaltuneError(f"{path}: larger than {limit('bytes')} bytes (CRYSTALTUNE_MAX_BYTES raises the limit)")
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(path, raw, limit("bytes"))
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError:
        raise CrystaltuneError(f"{path}: not a text file (not UTF-8)") from None


def _gunzip(path: Path, raw: bytes, cap: int) -> bytes:
    """Decompress at most ``cap`` bytes: a small gzip cannot expand into all of the memory."""
    out = bytearray()
    try:
        while raw:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member at a time (files may hold several)
            out += d.decompress(raw, cap + 1 - len(out))
            if len(out) > cap:
                raise CrystaltuneError(
                    f"{path}: expands to more than {cap} bytes (CRYSTALTUNE_MAX_BYTES raises the limit)"
                )
            if not d.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            raw = d.unused_data
    except (OSError, EOFError, zlib.error) as exc:
        raise CrystaltuneError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    return bytes(out)


def _check_count(path: Path, out: RawDataset) -> None:
    if len(out.records) + len(out.skipped) > limit("records"):
        raise CrystaltuneError(
            f"{path}: more than {limit('records')} records (--max-records or CRYSTALTUNE_MAX_RECORDS raises the limit)"
        )


def _json_problem(exc: ValueError) -> str:
    """What is wrong with a JSON text, in a few words (a decode error's message and line, or the number
    too long to convert)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}"
    return str(exc).split(";")[0][:120]


def _is_single_json(text: str) -> bool:
    """True when the whole text is one JSON value (a dict keyed by id), not JSON lines."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _top_level_records(path: Path, data: Any) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if any(k in data for k in STRUCTURE_KEYS):
            return [data]  # a single record
        for key in ("data", "records", "materials"):
            if isinstance(data.get(key), list):
                return data[key]
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"id": k, **v} for k, v in data.items()]  # {id: record}
    raise CrystaltuneError(
        f"{path}: top-level JSON is a {type(data).__name__}, expected a list of records ({FORMATS_HELP})"
    )


def _printable(rid: str, cap: int = 200) -> str:
    """An id fit for messages and CSV rows: control characters escaped (a newline in an id would split
    a one-line reason), at most ``cap`` characters."""
    if not rid.isprintable():
        rid = rid.encode("unicode_escape").decode("ascii")
    return rid if len(rid) <= cap else rid[:cap] + "..."


def _add(out: RawDataset, item: Any, line: int, where: str) -> None:
    if not isinstance(item, dict):
        out.skipped.append({"id": where, "reason": f"{where}: record is a {type(item).__name__}, not an object"})
        return
    rid = next((item[k] for k in ID_KEYS if k in item and item[k] not in (None, "")), None)
    rid = _printable(str(rid)) if rid is not None else where
    skey = next((k for k in STRUCTURE_KEYS if k in item), None)
    if skey is None or item[skey] in (None, "", {}):
        out.skipped.append(
            {"id": rid, "reason": f"{where} ({rid}): no structure (keys tried: {', '.join(STRUCTURE_KEYS)})"}
        )
        return
    props: dict[str, float] = {}
    bad: dict[str, str] = {}
    for key, value in item.items():
        if key in STRUCTURE_KEYS or key in ID_KEYS:
            continue
        name = ALIASES.get(key, key)
        if isinstance(value, str):  # JSON strings are labels (formula, names), never coerced
            bad[name] = f"is not a number ({value[:30]!r})"
            continue
        number, problem = to_number(value)
        if problem is None:
            props[name] = number
        elif value is None:
            bad[name] = "is missing (null)"
        elif problem != "not a number":
            bad[name] = f"is {problem}"
    out.records.append({"id": rid, "line": line, "structure": item[skey], "props": props, "bad_props": bad})


def to_number(value: Any) -> tuple[float, str | None]:
    """Coerce a JSON/CSV scalar to a finite float; return (nan, reason) when it is not one."""
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return math.nan, "not a number"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return math.nan, "not a number"
    if not isinstance(value, (int, float)):
        return math.nan, "not a number"
    value = float(value)
    if not math.isfinite(value):
        return math.nan, f"not finite ({value})"
    return value, None


def _read_json_folder(folder: Path, files: list[Path]) -> RawDataset:
    out = RawDataset(folder)
    for i, file in enumerate(files, start=1):
        try:
            item = json.loads(_read_text(file))
        except (CrystaltuneError, ValueError) as exc:
            out.skipped.append({"id": file.name, "reason": f"{file.name}: not valid JSON ({exc})"})
            continue
        if isinstance(item, dict) and not any(k in item for k in ID_KEYS):
            item = {"id": file.name.split(".")[0], **item}
        _add(out, item, line=i, where=file.name)
    return out


def _inside(folder: Path, rid: str, cif: Path) -> bool:
    """Whether ``rid`` is a plain file name whose CIF (links followed) lies in ``folder`` itself: only
    files there are read, and the cache key (a hash of the folder's files) covers every one of them."""
    if not rid or "/" in rid or "\\" in rid or rid in (".", "..") or Path(rid).is_absolute():
        return False
    return cif.resolve().parent == folder.resolve()


def _read_cif_folder(folder: Path) -> RawDataset:
    """The reference CGCNN layout: ``id_prop.csv`` rows ``id,target[,target...]`` and ``<id>.cif``."""
    out = RawDataset(folder)
    try:
        with open(folder / "id_prop.csv", newline="", encoding="utf-8-sig") as fh:  # BOM: not part of the first id
            rows = list(csv.reader(fh))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CrystaltuneError(f"{folder / 'id_prop.csv'}: not a readable CSV of id,target rows ({exc})") from None
    if not rows:
        raise CrystaltuneError(f"{folder / 'id_prop.csv'}: file is empty")
    for lineno, row in enumerate(rows, start=1):
        if not row or not row[0].strip():
            continue
        rid = _printable(row[0].strip())
        cif = folder / f"{rid}.cif"
        if not _inside(folder, rid, cif):
            out.skipped.append(
                {
                    "id": rid,
                    "reason": f"id_prop.csv line {lineno} ({rid[:80]}): the id names a file outside "
                    f"{folder} (ids are file names in that folder)",
                }
            )
            continue
        if not cif.exists():
            out.skipped.append({"id": rid, "reason": f"id_prop.csv line {lineno} ({rid}): {cif.name} not found"})
            continue
        props: dict[str, float] = {}
        bad: dict[str, str] = {}
        for k, value in enumerate(row[1:]):
            name = "target" if k == 0 else f"target{k}"
            number, problem = to_number(value.strip())
            if problem is None:
                props[name] = number
            else:
                bad[name] = f"is {problem} ({value.strip()[:30]!r})"
        out.records.append(
            {
                "id": rid,
                "line": lineno,
                "structure": cif.read_text(errors="replace"),
                "props": props,
                "bad_props": bad,
                "fmt": "cif",
            }
        )
    return out
