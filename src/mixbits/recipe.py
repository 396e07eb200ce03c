"""Recipes: a run's settings as data, loaded into the frozen configs of `mixbits.config`.

A recipe is a YAML (or JSON) mapping that mirrors `RunConfig`: its plain fields at the top
(`model`, `quantizer`, `damage`, `device`, `tasks`, ...) and one mapping per sub-config
(`data:`, `allocation:`, `gptq:`, `train:`, `iterative:`). Every field may be left out and keeps
its default. Layer pins and keeps are data: `allocation.pins` is either the config's own list
(`["down_proj=w4g64", "o_proj=4"]`) or a mapping `{down_proj: w4g64}` (regex -> spec), and
`allocation.keep` a regex of the layers kept in 16 bit. `train: {...}` turns Block-AP on (`train:
null`, or leaving it out, keeps it off); `train.dataset`, `train.init` and `train.seed` follow the
run's `data.dataset`, `quantizer` and `data.seed` unless given. `iterative: {...}` likewise.

    data: {dataset: wiki, seqlen: 512, calib_windows: 16}
    allocation: {target_bpw: 3.25, bits: [2, 3, 4], pins: {down_proj: w4g64}, keep: 'layers\\.0\\.'}
    quantizer: gptq
    gptq: {clip: true}

Validation is strict and runs before anything is loaded: each field is checked against its
dataclass type (an integer is not text, `"3.25"` is not a number, `true` is not an integer), an
unknown field is refused naming the nearest known one, and every refusal is a `UserError` naming
the file, the field path (`allocation.target_bpw`), the bad value and what is accepted. The file
is read through `mixbits.safeload` (alias, depth and size limits).

Settings are applied as *field paths*: `with_fields(cfg, {"data.seqlen": 256})` replaces fields of
a config, each dataclass rebuilt once (so its checks see all its new fields together). The CLI
does the same with the flags a user gave, on top of a recipe. Errors of `with_fields` name the
fields in backticks (`` `train.epochs` ``) so the CLI can show its flags instead.

`recipe_dict(cfg)` is the resolved recipe of a config: every field but the output-only ones
(`OUTPUT_ONLY`: where and how a run writes, never what it computes). `pipeline.run` writes it to
`recipe.yaml` in the run folder and `results.json` records it, so `mixbits run --recipe
runs/x/recipe.yaml --output-dir runs/y` repeats the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from functools import cache
from pathlib import Path

from mixbits.config import IterativeConfig, RunConfig, TrainConfig
from mixbits.errors import UserError
from mixbits.quant.spec import QuantSpec

OUTPUT_ONLY = ("output_dir", "overwrite", "resume", "progress")  # where and how a run writes, not what it makes
SECTIONS = {"train": TrainConfig, "iterative": IterativeConfig}  # optional sub-configs: null = off
FOLLOWS = {"train.dataset": "data.dataset", "train.init": "quantizer", "train.seed": "data.seed"}
ONE_OF = {"allocation.target_bpw": "allocation.target_size_mb", "allocation.target_size_mb": "allocation.target_bpw"}


# --- the fields of the configs ------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: object) -> type | None:
    """The dataclass in `tp` (`TrainConfig` or `TrainConfig | None`), else None."""
    args = typing.get_args(tp) if _is_union(tp) else (tp,)
    found = [a for a in args if dataclasses.is_dataclass(a) and a is not QuantSpec]
    return found[0] if found else None


def _is_union(tp: object) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def field_paths(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf field of `cls` as a dotted path (`data.seqlen`), sub-configs walked; an optional
    section (`train`) is listed itself too, since it can be turned on and off."""
    out = []
    for f in dataclasses.fields(cls):
        path, sub = prefix + f.name, _dataclass_of(_hints(cls)[f.name])
        if sub is None:
            out.append(path)
        else:
            if path in SECTIONS:
                out.append(path)
            out.extend(field_paths(sub, path + "."))
    return out


def get_path(cfg: object, path: str) -> object:
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


# --- strict reading of one value -----------------------------------------------------------------


def _accepted(tp: object) -> str:
    """What a value of type `tp` looks like, in words, for messages."""
    if _is_union(tp):
        return " or ".join(_accepted(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_accepted(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", Path: "a path (text)",
            type(None): "null", QuantSpec: "a spec label such as w4g128"}.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: object, tp: object, path: str, source: str) -> object:
    """`value` read from a recipe as type `tp`, strictly; else a UserError naming source, path, value and
    what is accepted."""

    def refuse(extra: str = "") -> UserError:
        return UserError(f"{source}: {path} = {value!r} is not accepted; expected {_accepted(tp)}{extra}")

    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, path, source)
            except UserError:
                continue
        raise refuse()
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise refuse(" (a YAML list such as [2, 3, 4])")
        item = typing.get_args(tp)[0]
        return tuple(convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif tp is QuantSpec:
        if isinstance(value, str):
            try:
                return QuantSpec.parse(value)
            except ValueError as err:
                raise UserError(f"{source}: {path} = {value!r} is not a spec label ({err}); e.g. w4g128") from None
    else:
        raise TypeError(f"recipe: no reader for the type {tp!r} of {path}")  # a config field of a new type
    raise refuse()


def _pins(value: object, path: str, source: str) -> object:
    """`allocation.pins` as a mapping {regex: spec or bits} -> the config's list form ("regex=spec")."""
    if not isinstance(value, dict):
        return value
    out = []
    for regex, spec in value.items():
        if not isinstance(regex, str) or isinstance(spec, bool) or not isinstance(spec, (str, int)):
            raise UserError(f"{source}: {path} entry {regex!r}: {spec!r} is not accepted; expected "
                            "regex: spec, e.g. {down_proj: w4g64} or {down_proj: 4}")
        out.append(f"{regex}={spec}")
    return out


# --- a recipe mapping -> field paths -------------------------------------------------------------


def _unknown(name: str, cls: type, prefix: str, source: str) -> UserError:
    known = [f.name for f in dataclasses.fields(cls)]
    elsewhere = [p for p in field_paths() if p.rsplit(".", 1)[-1] == name]  # a field of another section
    near = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = (f"did you mean {elsewhere[0]}?" if elsewhere else f"did you mean {prefix}{near[0]}?" if near
            else f"known fields here: {', '.join(known)}")
    return UserError(f"{source}: unknown field {prefix}{name}; {hint}")


def recipe_fields(data: object, source: str = "recipe", cls: type = RunConfig, prefix: str = "") -> dict[str, object]:
    """A recipe mapping read strictly into {field path: value}; an optional section given as a
    mapping adds `{section: True}` (turned on), as null `{section: None}` (off)."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where} must be a mapping of field: value, not {type(data).__name__} "
                        f"{str(data)[:60]!r}")
    hints, out = _hints(cls), {}
    for name, value in data.items():
        if name not in hints:
            raise _unknown(name, cls, prefix, source)
        path, tp = prefix + name, hints[name]
        sub = _dataclass_of(tp)
        if sub is None:
            value = _pins(value, path, source) if path == "allocation.pins" else value
            out[path] = convert(value, tp, path, source)
        elif value is None and path in SECTIONS:
            out[path] = None
        else:
            if path in SECTIONS:
                out[path] = True
            out.update(recipe_fields({} if value is None else value, source, sub, path + "."))
    return out


def load_recipe(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of the recipe file `path` (YAML or JSON; a run's results.json gives its `recipe`),
    on top of `base` (default: RunConfig())."""
    from mixbits.safeload import load_file

    source = f"recipe {str(path)!r}"
    data = load_file(path, "recipe")
    if isinstance(data, dict) and str(data.get("format", "")).startswith("mixbits.results/") and "recipe" in data:
        data = data["recipe"]  # a run's results.json: the resolved recipe it records
    return config_from({} if data is None else data, source, base)


def config_from(data: object, source: str = "recipe", base: RunConfig | None = None) -> RunConfig:
    """A recipe mapping (already parsed) -> RunConfig; the config's own checks name `source`."""
    flat = recipe_fields(data, source)
    try:
        return with_fields(base or RunConfig(), flat)
    except UserError as err:
        section, message = getattr(err, "section", None), str(err).replace("`", "")
        where = f"{section}: " if section and f"{section}." not in message else ""  # when no field is named
        raise UserError(f"{source}: {where}{message}") from None


# --- applying field paths ------------------------------------------------------------------------


def with_fields(cfg: RunConfig, flat: dict[str, object]) -> RunConfig:
    """`cfg` with the fields at the paths of `flat` replaced; `{section: True}` turns an optional
    section on (its defaults), `{section: None}` off. Follows FOLLOWS and ONE_OF (giving
    `allocation.target_size_mb` alone clears `allocation.target_bpw`)."""
    flat = dict(flat)
    for path, other in ONE_OF.items():
        if flat.get(path) is not None and other not in flat:
            flat[other] = None
    train_on = flat.get("train", cfg.train) is not None
    for target, src in FOLLOWS.items():
        if train_on and target not in flat and (src in flat or flat.get("train") is True):
            flat[target] = flat.get(src, get_path(cfg, src))
    return _replace(cfg, flat, "")


def _replace(obj: object, flat: dict[str, object], prefix: str) -> object:
    own, nested = {}, {}
    for path, value in flat.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    for name in [*own, *nested]:
        if name not in _hints(type(obj)):
            raise UserError(f"`{prefix}{name}` is not a config field")
    for name, section in SECTIONS.items():
        if prefix == "" and own.get(name) is True:
            own[name] = getattr(obj, name) or section()
    for name, sub in nested.items():
        current = own.get(name, getattr(obj, name, None))
        if current is None:
            given = ", ".join(f"`{prefix}{name}.{k}`" for k in sub)
            raise UserError(f"settings that need `{prefix}{name}`, which is off: {given}; turn `{prefix}{name}` on "
                            "or drop them")
        try:
            own[name] = _replace(current, sub, f"{prefix}{name}.")
        except UserError as err:  # a sub-config's own check: say which section (innermost first)
            err.section = getattr(err, "section", None) or f"{prefix}{name}"
            raise
    return dataclasses.replace(obj, **own)


# --- the resolved recipe --------------------------------------------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def recipe_dict(cfg: RunConfig) -> dict:
    """Every field of `cfg` that makes the result, as plain data (lists, str, numbers, null): the
    recipe that repeats the run (OUTPUT_ONLY fields left out)."""
    return {k: _plain(v) for k, v in cfg.to_dict().items() if k not in OUTPUT_ONLY}


def recipe_yaml(cfg: RunConfig) -> str:
    import yaml

    head = "# mixbits recipe: `mixbits run --recipe THIS_FILE --output-dir DIR` repeats this run\n"
    return head + yaml.safe_dump(recipe_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


def save_recipe(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved recipe of `cfg` to `path` (atomically) and return the path."""
    from mixbits.io import atomic_write_text

    atomic_write_text(path, recipe_yaml(cfg))
    return Path(path)
