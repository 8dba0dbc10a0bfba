"""YAML files (search spaces, trial configs) read on a budget: safe tags only, at most
``MAX_BYTES`` of text and ``MAX_NODES`` nodes after aliases are expanded, so a few hundred bytes of
anchors cannot expand into gigabytes ("billion laughs"). One-line errors name the file and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import CrystaltuneError

MAX_BYTES = 1 << 20  # a search space or config is a few KB
MAX_NODES = 100_000  # scalars, lists and mappings, each alias counted with everything it stands for


def _size(node, memo: dict) -> int:
    """Nodes under ``node`` with aliases expanded (memoised per node object, so counting stays cheap)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1
        if isinstance(node, yaml.SequenceNode):
            memo[key] += sum(_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] += sum(_size(k, memo) + _size(v, memo) for k, v in node.value)
    return memo[key]


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Parse ``path``; a missing, oversized, non-UTF-8, invalid or over-budget file raises one
    CrystaltuneError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CrystaltuneError(f"{path}: no such {what}" + (" (a folder)" if path.is_dir() else ""))
    if path.stat().st_size > MAX_BYTES:
        raise CrystaltuneError(f"{path}: {path.stat().st_size} bytes; a {what} may have at most {MAX_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a UTF-8 BOM is tolerated
    except UnicodeDecodeError as exc:
        raise CrystaltuneError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()  # the node graph: aliases are shared nodes, not yet copies
            if node is None:
                return None
            if _size(node, {}) > MAX_NODES:
                raise CrystaltuneError(f"more than {MAX_NODES} YAML nodes once aliases are expanded")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except CrystaltuneError as exc:
        raise CrystaltuneError(f"{path}: {exc}") from None
    except RecursionError:
        raise CrystaltuneError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise CrystaltuneError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
