"""Readers: dataset files (JSON lines, JSON lists, SNUMAT, CIF folders) -> raw records.

A raw record is a plain dict ``{"id", "line", "structure", "props"}`` where ``structure`` is still
unparsed (a pymatgen dict or a CIF/POSCAR string) so parsing can run in parallel workers. Problems
with one record become ``{"id", "reason"}`` entries in ``skipped``; problems with the file itself
raise :class:`CrystaltuneError`.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import stat
import sys
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


class ReadError(CrystaltuneError):
    """A file that cannot be read as a dataset file; ``why`` is the reason without the path, for the skip
    line of a file inside a folder."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{shown(path)}: {why}")
        self.why = why


def check_source(path: Path) -> None:
    """Raise a one-line error when a dataset path is missing or is neither a file, a folder nor a pipe:
    a FIFO nobody writes to, a device (/dev/zero) or a socket would hang or never end the read."""
    kind = path_kind(path)
    if kind in ("file", "folder", "pipe"):
        return
    if kind == "missing":
        raise CrystaltuneError(f"{path}: no such file or folder (formats: {FORMATS_HELP})")
    if kind.startswith(("a symbolic link", "a dangling", "cannot")):
        raise CrystaltuneError(f"{path}: {kind}")
    raise CrystaltuneError(f"{path}: not a regular file or folder ({kind}); give a dataset file")


def read_source(path: str | Path, raw: bytes | None = None) -> RawDataset:
    """Read a file or folder in any supported format; raise a one-line error if it is unusable.

    ``raw``: the file's bytes when the caller already read them (a pipe can be read only once)."""
    path = Path(path)
    check_source(path)
    if path.is_dir():
        if os.path.lexists(path / "id_prop.csv"):
            return _read_cif_folder(path)
        files = sorted(p for p in path.iterdir() if p.suffix == ".json" or p.name.endswith(".json.gz"))
        if files:
            return _read_json_folder(path, files)
        raise CrystaltuneError(f"{path}: folder has neither id_prop.csv nor *.json files ({FORMATS_HELP})")
    text = _read_text(path, raw)
    if not text.strip():
        raise CrystaltuneError(f"{path}: file is empty")
    out = RawDataset(path)
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and _is_single_json(stripped)):
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or a number too long to convert
            raise CrystaltuneError(f"{path}: not valid JSON ({_json_problem(exc)})") from None
        except RecursionError:
            raise CrystaltuneError(f"{path}: {TOO_DEEP}") from None
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
        item, problem = _parse_json(line)
        if problem:
            out.skipped.append({"id": f"line {lineno}", "reason": f"line {lineno}: {problem}"})
            continue
        _add(out, item, line=lineno, where=f"line {lineno}")
        _check_count(path, out)
    return out


#: Why a JSON text nested deeper than Python's parser recurses is refused (a record, not the run, fails).
TOO_DEEP = f"nested too deeply (over about {sys.getrecursionlimit()} levels of JSON arrays and objects)"


def _parse_json(text: str) -> tuple[Any, str | None]:
    """One JSON value (a JSON-lines record, a file of a JSON folder), or why it is not one (bad JSON,
    a number too long to convert, nested too deeply)."""
    try:
        return json.loads(text), None
    except ValueError as exc:
        return None, f"not valid JSON ({_json_problem(exc)})"
    except RecursionError:
        return None, TOO_DEEP


def limit(name: str) -> int:
    """Reading budgets, raised with CRYSTALTUNE_MAX_RECORDS / CRYSTALTUNE_MAX_BYTES (or --max-records)."""
    return int(os.environ.get(f"CRYSTALTUNE_MAX_{name.upper()}", LIMITS[name]))


LIMITS = {"records": 1_000_000, "bytes": 4 << 30}  # per dataset file (bytes: after decompression)


def path_kind(path: str | Path) -> str:
    """What a path is: "file", "folder", "pipe" (anonymous, e.g. ``<(cat f)``), "missing", or in words
    what else ("a character device", "a FIFO" (a named pipe), "a socket", "a symbolic link loop", ...)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _stat_problem(path, exc)
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        # /dev/fd/N of a process substitution links to "pipe:[inode]", which no folder holds
        return "a FIFO" if os.path.exists(os.path.realpath(path)) else "pipe"
    for test, words in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def _stat_problem(path: str | Path, exc: OSError) -> str:
    """Why a path cannot be looked at, in words: missing, a link loop, a dangling link, or the OS's reason."""
    try:
        link = os.readlink(path)
    except OSError:
        link = None
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    if link is not None and exc.errno == errno.ENOENT:
        return f"a dangling symbolic link (to {shown(link)})"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "missing"
    return f"cannot be read ({exc.strerror})"


def read_bytes(path: Path, pipe_ok: bool = False) -> bytes:
    """The bytes of a regular file, or of a pipe read once (``pipe_ok``), at most CRYSTALTUNE_MAX_BYTES:
    a special file, an endless pipe or a file replaced while it is opened cannot hang the read or fill memory."""
    cap = limit("bytes")
    kind = path_kind(path)
    if kind not in ("file", "pipe") or (kind == "pipe" and not pipe_ok):
        raise ReadError(path, _not_a_file(kind))
    try:  # O_NONBLOCK: a FIFO put in the file's place after the check cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ReadError(path, f"cannot read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (pipe_ok and stat.S_ISFIFO(st.st_mode))):
            raise ReadError(path, "not a regular file (it changed while it was opened)")
        if st.st_size > cap:
            raise ReadError(path, _too_big(cap))
        os.set_blocking(fd, True)
        data = _read_all(fd, cap) if stat.S_ISFIFO(st.st_mode) else os.fdopen(fd, "rb", 0, closefd=False).readall()
    except OSError as exc:
        raise ReadError(path, f"cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > cap:  # a pipe past the limit, or a file that grew
        raise ReadError(path, _too_big(cap, pipe=stat.S_ISFIFO(st.st_mode)))
    return data


def _read_all(fd: int, cap: int) -> bytes:
    """A pipe's bytes up to EOF, stopping at ``cap`` + 1 (an endless pipe, e.g. ``<(cat /dev/urandom)``)."""
    buf = bytearray()
    while len(buf) <= cap:
        chunk = os.read(fd, min(1 << 20, cap + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _too_big(cap: int, pipe: bool = False) -> str:
    """The one-line reason for a file (or a pipe) past the byte limit."""
    what = "a pipe giving more than" if pipe else "larger than"
    return f"{what} {cap} bytes (CRYSTALTUNE_MAX_BYTES raises the limit)"


def _not_a_file(kind: str) -> str:
    """Why a path whose kind is not "file" cannot be read as a file, in words."""
    if kind == "missing":
        return "no such file"
    if kind == "folder":
        return "a folder, not a file"
    if kind == "pipe":
        return "not a regular file (a pipe)"
    if kind.startswith(("a symbolic link", "a dangling", "cannot")):
        return kind
    return f"not a regular file ({kind})"


def _read_text(path: Path, raw: bytes | None = None) -> str:
    """A dataset file as text (read here unless ``raw`` holds its bytes; gzip expanded within the limit)."""
    if raw is None:
        raw = read_bytes(path, pipe_ok=True)
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(path, raw, limit("bytes"))
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError:
        raise ReadError(path, "not a text file (not UTF-8)") from None


def _gunzip(path: Path, raw: bytes, cap: int) -> bytes:
    """Decompress at most ``cap`` bytes: a small gzip cannot expand into all of the memory."""
    out = bytearray()
    try:
        while raw:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member at a time (files may hold several)
            out += d.decompress(raw, cap + 1 - len(out))
            if len(out) > cap:
                raise ReadError(path, f"expands to more than {cap} bytes (CRYSTALTUNE_MAX_BYTES raises the limit)")
            if not d.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            raw = d.unused_data
    except (OSError, EOFError, zlib.error) as exc:
        raise ReadError(path, f"corrupt or truncated gzip file ({exc})") from None
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
    """True when the whole text is one JSON value (a dict keyed by id), not JSON lines. Too deep to
    parse: one value unless its first line is a whole record (or itself too deep) as in JSON lines."""
    try:
        json.loads(text)
    except ValueError:
        return False
    except RecursionError:
        lines = text.strip().split("\n", 1)
        return len(lines) == 1 or _parse_json(lines[0])[1] not in (None, TOO_DEEP)
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


def escape_id(rid: str) -> str:
    """An id on one line, reversibly, so distinct ids stay distinct: as it is unless it holds a backslash
    or an unprintable character; then a backslash is written \\\\, newline/tab/CR as \\n \\t \\r, an
    undecodable byte of a file name (surrogateescape) as \\xHH and any other unprintable as \\uHHHH."""
    if rid.isprintable() and "\\" not in rid:
        return rid
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else _escape_char(c)) for c in rid)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(c: str) -> str:
    """An unprintable character as a backslash escape (file names' undecodable bytes as \\xHH)."""
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape of byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def short(text: str, cap: int = 200) -> str:
    """An escaped id or name cut to ``cap`` characters, for messages (ids themselves are never cut)."""
    return text if len(text) <= cap else text[:cap] + "..."


def shown(path: str | Path) -> str:
    """A path or file name fit for a one-line message: escaped as :func:`escape_id` escapes ids."""
    return escape_id(os.fsdecode(path))


def _add(out: RawDataset, item: Any, line: int, where: str) -> None:
    if not isinstance(item, dict):
        out.skipped.append({"id": where, "reason": f"{where}: record is a {type(item).__name__}, not an object"})
        return
    rid = next((item[k] for k in ID_KEYS if k in item and item[k] not in (None, "")), None)
    rid = escape_id(str(rid)) if rid is not None else where
    skey = next((k for k in STRUCTURE_KEYS if k in item), None)
    if skey is None or item[skey] in (None, "", {}):
        out.skipped.append(
            {"id": rid, "reason": f"{where} ({short(rid)}): no structure (keys tried: {', '.join(STRUCTURE_KEYS)})"}
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
    """One record per ``*.json`` file; a file that cannot be read or parsed is skipped with its reason."""
    out = RawDataset(folder)
    for i, file in enumerate(files, start=1):
        name = shown(file.name)
        try:
            item, problem = _parse_json(_read_text(file, read_bytes(file)))
        except ReadError as exc:
            item, problem = None, exc.why
        if problem:
            out.skipped.append({"id": escape_id(file.name), "reason": f"{name}: {problem}"})
            continue
        if isinstance(item, dict) and not any(k in item for k in ID_KEYS):
            item = {"id": file.name.split(".")[0], **item}
        _add(out, item, line=i, where=name)
    return out


def _inside(folder: Path, rid: str, cif: Path) -> bool:
    """Whether ``rid`` is a plain file name whose CIF (links followed) lies in ``folder`` itself: only
    files there are read, and the cache key (a hash of the folder's files) covers every one of them."""
    if not rid or "/" in rid or "\\" in rid or rid in (".", "..") or Path(rid).is_absolute():
        return False
    # a link loop or a dangling link is in the folder: the read then says what it is
    return os.path.dirname(os.path.realpath(cif)) == os.path.realpath(folder)


def read_cif(cif: Path) -> str:
    """A CIF file's text (undecodable bytes replaced); a one-line error naming it when it is not a
    readable regular file (a folder, a link loop, a dangling link, a FIFO, a device, too large)."""
    return read_bytes(cif).decode("utf-8", errors="replace")


def _read_cif_folder(folder: Path) -> RawDataset:
    """The reference CGCNN layout: ``id_prop.csv`` rows ``id,target[,target...]`` and ``<id>.cif``."""
    out = RawDataset(folder)
    table = folder / "id_prop.csv"
    try:
        # BOM: not part of the first id
        rows = list(csv.reader(io.StringIO(read_bytes(table).decode("utf-8-sig"), newline="")))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CrystaltuneError(f"{table}: not a readable CSV of id,target rows ({exc})") from None
    if not rows:
        raise CrystaltuneError(f"{table}: file is empty")
    for lineno, row in enumerate(rows, start=1):
        if not row or not row[0].strip():
            continue
        name = row[0].strip()
        rid = escape_id(name)
        where = f"id_prop.csv line {lineno} ({short(rid)})"
        cif = folder / f"{name}.cif"
        if not _inside(folder, name, cif):
            out.skipped.append(
                {
                    "id": rid,
                    "reason": f"id_prop.csv line {lineno} ({short(rid, 80)}): the id names a file outside "
                    f"{folder} (ids are file names in that folder)",
                }
            )
            continue
        if path_kind(cif) == "missing":
            out.skipped.append({"id": rid, "reason": f"{where}: {shown(cif.name)} not found"})
            continue
        try:
            text = read_cif(cif)
        except ReadError as exc:
            out.skipped.append({"id": rid, "reason": f"{where}: {shown(cif.name)}: {exc.why}"})
            continue
        props, bad = _row_props(row[1:])
        out.records.append(
            {"id": rid, "line": lineno, "structure": text, "props": props, "bad_props": bad, "fmt": "cif"}
        )
    return out


def _row_props(values: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """An id_prop.csv row's targets (target, target1, ...) and why any of them is not a number."""
    props: dict[str, float] = {}
    bad: dict[str, str] = {}
    for k, value in enumerate(values):
        name = "target" if k == 0 else f"target{k}"
        number, problem = to_number(value.strip())
        if problem is None:
            props[name] = number
        else:
            bad[name] = f"is {problem} ({value.strip()[:30]!r})"
    return props, bad
