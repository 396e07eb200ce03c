"""Read user-supplied YAML and JSON with limits, so a hostile or broken file fails with one clear line.

Every plan, seed file, sensitivity table and recipe that a user hands to mixbits is read here. Three
limits guard against files that parse but are not data:

- aliases: YAML anchors let a few hundred bytes expand to billions of nodes (the "billion laughs"
  alias bomb); a document may use at most MAX_ALIASES aliases and expand to at most MAX_NODES nodes,
  counted with every alias expanded, before anything is built from it;
- depth: nesting deeper than MAX_DEPTH (YAML or JSON) is refused instead of overflowing Python's stack
  (a RecursionError traceback);
- text: a file that is not UTF-8 is refused naming the file, not with a bare UnicodeDecodeError.

Every refusal is a `UserError` whose message names the file. Non-finite numbers (NaN, Infinity) are
parsed; the loaders of each format check them where they know the layer they belong to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mixbits.errors import UserError

MAX_DEPTH = 64
MAX_ALIASES = 100
MAX_NODES = 1_000_000
YAML_SUFFIXES = (".yaml", ".yml")

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; a missing, unreadable or undecodable file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None


def load_file(path: str | Path, what: str = "file") -> object:
    """Parse `path` as YAML (.yaml/.yml) or JSON (anything else), with the limits of this module."""
    path = Path(path)
    text = read_text(path, what)
    source = f"{what} {str(path)!r}"
    return loads_yaml(text, source) if path.suffix.lower() in YAML_SUFFIXES else loads_json(text, source)


def loads_json(text: str, source: str = "JSON text") -> object:
    """json.loads after a depth check; `source` (e.g. "plan file 'x.json'") names the input in errors."""
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{source} nests deeper than {MAX_DEPTH} levels; mixbits files are shallow, "
                                "so this is not one")
        elif token in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source} is not valid JSON: {err}") from None
    except RecursionError:  # unreachable after the depth scan, kept so no stack overflow escapes
        raise UserError(f"{source} nests too deeply") from None


def loads_yaml(text: str, source: str = "YAML text") -> object:
    """yaml.safe_load with limits on aliases, expanded size and depth; errors name `source`."""
    loader = _LimitedLoader(text, source)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {err}") from None
    finally:
        loader.dispose()


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and depth while composing, and expanded nodes before constructing."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source, self.aliases, self.depth = source, 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise UserError(f"{self.source} uses more than {MAX_ALIASES} YAML aliases (*name); "
                                "write the values out instead")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UserError(f"{self.source} nests deeper than {MAX_DEPTH} levels; mixbits files are shallow, "
                            "so this is not one")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if _expanded_nodes(node, {}) > MAX_NODES:
            raise UserError(f"{self.source} expands to more than {MAX_NODES:,} values through YAML aliases "
                            "(an alias bomb); write the values out instead")
        return node


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of `node` with every alias expanded; shared nodes are counted once per use, computed once."""
    key = id(node)
    if key not in memo:
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_nodes(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
        else:
            memo[key] = 1
    return memo[key]


def safetensors_header(path: str | Path, what: str = "weights file") -> tuple[dict, int]:
    """(the header {name: {dtype, shape, data_offsets}, without "__metadata__"}, the byte offset where
    the data starts) of a .safetensors file, refusing a truncated or corrupt one before any tensor is read.

    Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data; the file must be exactly 8 + N + the largest end offset bytes long."""
    path = Path(path)
    problem, header, n = None, {}, 0
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                problem = "its header is cut off"
            else:
                header = json.loads(handle.read(n).decode("utf-8"))
                header = {k: v for k, v in header.items() if k != "__metadata__"}
                ends = [v["data_offsets"][1] for v in header.values()]
                if any(not (0 <= v["data_offsets"][0] <= v["data_offsets"][1]) for v in header.values()):
                    problem = "a tensor's data offsets run backwards"
                expected = 8 + n + max(ends, default=0)
                if size < expected:
                    problem = f"it is truncated ({size:,} of {expected:,} bytes)"
                elif size > expected:
                    problem = f"it has {size - expected:,} bytes beyond its last tensor"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # JSON, UTF-8 or layout errors
        problem = "its header is not valid safetensors JSON"
    except OSError as err:
        problem = f"it cannot be read ({err.strerror or err})"
    if problem:
        raise UserError(f"{what} {str(path)!r} is corrupt: {problem}; copy or write it again")
    return header, 8 + n


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Refuse a truncated or corrupt .safetensors file from its header alone (`safetensors_header`)."""
    safetensors_header(path, what)
