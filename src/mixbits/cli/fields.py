"""Command options generated from a config dataclass: one flag per field, its type and default read
from the dataclass, its help from one table per command.

`config_options(ConfigClass, helps, ...)` decorates a typer command: every field named in `helps`
becomes `--field-name` (typed as the field, default from `ConfigClass()`; comma-list fields take
text parsed by `mixbits.parsing`), and the command receives one `ConfigOptions` whose `config()`
builds the frozen config (inside the command's `user_errors`, so a bad value is the config's own
UserError). The command's other parameters (arguments, --overwrite, --verbose) stay as they are.
Fields the command does not expose are listed in `hidden`; `unexposed(cls, helps, hidden)` names
any field in neither, so a test fails when a new field gets no flag (tests/cli/test_fields.py).

`mixbits run` and its relatives build a RunConfig with nested sections and recipes
(`cli/options.py`); this module serves the flat configs: analyze, train, classify.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import typer

from mixbits.parsing import parse_floats, parse_group_sizes, parse_ints, split_list

__all__ = ["ConfigOptions", "config_options", "unexposed", "with_parameters"]


def _join(values) -> str | None:
    return None if values is None else ",".join("pc" if v is None else str(v) for v in values)


def _list_parser(hint, name: str) -> Callable[[str], tuple] | None:
    """The comma-list parser of a tuple field (tuple[int, ...], tuple[float, ...], tuple[str, ...],
    group sizes tuple[int | None, ...]); None for any other field."""
    hint = _plain(hint)
    if typing.get_origin(hint) is not tuple:
        return None
    item = typing.get_args(hint)[0]
    flag = "--" + name.replace("_", "-")
    if type(None) in typing.get_args(item):
        return lambda text: parse_group_sizes(text, field=flag)
    if item is int:
        return lambda text: parse_ints(text, field=flag)
    if item is float:
        return lambda text: parse_floats(text, field=flag)
    return split_list


def _plain(hint):
    """`X | None` -> X; anything else as it is."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return hint


def _kind(hint, default, listed: bool):
    """The type typer reads for a field."""
    optional = default is None or _plain(hint) is not hint
    base = str if listed else _plain(hint)
    return Optional[base] if optional else base


@dataclass(frozen=True)
class ConfigOptions:
    """The typed values of one command line, turned into the config by `config()`."""

    cls: type
    values: Mapping[str, object]
    parsers: Mapping[str, Callable] = field(default_factory=dict)

    def config(self, **fields):
        """The frozen config: every flag's value (lists parsed), then `fields` (the command's own)."""
        values = {n: (self.parsers[n](v) if n in self.parsers and v is not None else v) for n, v in self.values.items()}
        return self.cls(**{**values, **fields})


def config_options(cls: type, helps: Mapping[str, str], *, flags: Mapping[str, str] | None = None,
                   base=None, parsers: Mapping[str, Callable] | None = None):
    """Decorate a typer command with one option per field in `helps` (module docstring).

    flags: field -> flag name where they differ (`use_cache` -> `cache`). base: the config whose values
    are the defaults (default `cls()`). parsers: field -> text parser overriding the list rule (a field
    whose flag takes text: e.g. one group size). The command takes `options: ConfigOptions`."""
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    flags, parsers = dict(flags or {}), dict(parsers or {})
    for name in helps:
        if name not in hints:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        parser = parsers.get(name) or _list_parser(hints[name], flags.get(name, name))
        if parser is not None:
            parsers[name] = parser

    def decorate(fn):
        kw = inspect.Parameter.KEYWORD_ONLY
        generated = []
        for name, text in helps.items():
            value = getattr(base, name)
            listed = name in parsers
            default = _join(value) if listed and isinstance(value, tuple) else value
            generated.append(inspect.Parameter(flags.get(name, name), kw, annotation=_kind(hints[name], value, listed),
                                               default=typer.Option(default, help=text)))

        def take(kwargs: dict) -> ConfigOptions:
            return ConfigOptions(cls, {name: kwargs.pop(flags.get(name, name)) for name in helps}, parsers)

        return with_parameters(fn, generated, take)

    return decorate


def with_parameters(fn: Callable, generated: list[inspect.Parameter], take: Callable[[dict], object]) -> Callable:
    """A typer command with `fn`'s own parameters (but `options`; --verbose last) and `generated`;
    `take(kwargs)` pops the generated values from a call's keywords and returns what `fn` receives
    as `options`. Shared by `config_options` and `cli.options.run_options`."""
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(fn).parameters.values() if p.name != "options"]
    last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name == "verbose"]
    params = [p for p in own if p.name != "verbose"] + generated + last

    @functools.wraps(fn)
    def command(**kwargs):
        options = take(kwargs)
        return fn(**kwargs, options=options)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer reads the signature above, not fn's
    return command


def unexposed(cls: type, helps: Mapping[str, str], hidden: tuple[str, ...]) -> list[str]:
    """Fields of `cls` that are neither a flag (`helps`) nor listed as set otherwise (`hidden`)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in helps and f.name not in hidden]
