"""The command-line options of a run, generated from the configs in one table.

`FLAGS` maps each flag to the config field paths it sets (`--seqlen` -> `data.seqlen`), with its
help and, for list fields, the parser from `mixbits.parsing`. `run_options(...)` adds a chosen set
of them (and `--recipe`) to a typer command: the command receives one `RunOptions`, whose
`config()` builds the RunConfig: the recipe (or the command's base config), then only the flags
the user actually typed (click's parameter source tells a typed flag from a default), applied with
`recipe.with_fields`. Each flag's default is read from the command's base config, so the CLI and
the configs cannot disagree.

`flags_in(message)` is the one place where config fields become flags: library errors name fields
in backticks (`` `data.seqlen` ``), the CLI prints `--seqlen`.

Config fields with no flag are set in a recipe; `RECIPE_ONLY` lists them (a test walks the
dataclasses so that a new field gets a flag or a line there).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from mixbits.cli.fields import with_parameters
from mixbits.config import RunConfig
from mixbits.parsing import parse_group_sizes, parse_ints, split_list
from mixbits.quant.spec import QuantSpec
from mixbits.recipe import SECTIONS, load_recipe, with_fields


def _join(values) -> str:
    return ",".join("pc" if v is None else str(v) for v in values)


def _spec(text: str) -> QuantSpec:
    from mixbits.errors import UserError

    try:
        return QuantSpec.parse(text)
    except ValueError as err:
        raise UserError(f"`iterative.spec` {text!r}: {err}; e.g. w4g128") from None


@dataclass(frozen=True)
class Flag:
    """One flag: `--name` (underscores as dashes) sets the config fields `paths` (`--gptq-act-order`
    sets two). kind: the type typer reads; parse: typed value -> field value (lists through
    mixbits.parsing); show: field value -> the flag's default."""

    name: str
    paths: tuple[str, ...]
    help: str
    kind: object = str
    parse: Callable[[object], object] | None = None
    show: Callable[[object], object] | None = None


def _toggle(name: str, section: str, help: str) -> Flag:
    """A flag that turns an optional sub-config (train, iterative) on, with its defaults."""
    return Flag(name, (section,), help, bool, parse=lambda on: True if on else None, show=lambda cfg: cfg is not None)


FLAGS: dict[str, Flag] = {f.name: f for f in [
    Flag("model", ("model",), "embedded name, Hugging Face hub id, or local HF folder"),
    Flag("target_bpw", ("allocation.target_bpw",), "average stored bits per weight over the block linears",
         Optional[float]),
    Flag("target_size_mb", ("allocation.target_size_mb",), "size of the whole saved model in MB (10^6 bytes); with "
         "ggml candidates (--candidates gguf|both) the GGUF file `mixbits export --format gguf` writes",
         Optional[float]),
    Flag("output_dir", ("output_dir",), "where results, plan and model are written", Path),
    Flag("dataset", ("data.dataset",), "wiki, canterbury, wikitext2, c4, or a .txt/.jsonl path"),
    Flag("seqlen", ("data.seqlen",), "tokens per window (2048 for paper numbers)", int),
    Flag("calib_windows", ("data.calib_windows",), "calibration windows for sensitivity", int),
    Flag("eval_windows", ("data.eval_windows",), "test windows to score; 0 = the whole split", int),
    Flag("seed", ("data.seed",), "seed of the calibration window sampler", int),
    Flag("bits", ("allocation.bits",), "candidate bit-widths", str, parse_ints, _join),
    Flag("group_sizes", ("allocation.group_sizes",), "candidate group sizes (pc = per-channel)", str,
         parse_group_sizes, _join),
    Flag("min_bits", ("allocation.min_bits",), "no layer below this many bits", int),
    Flag("max_bits", ("allocation.max_bits",), "no layer above this many bits (16 = may keep layers)", int),
    Flag("keep", ("allocation.keep",), "regex of layers kept in 16 bit", Optional[str]),
    Flag("pin", ("allocation.pins",), "REGEX=BITS or REGEX=SPEC, e.g. down_proj=4, down_proj=w4g64, or a ggml "
         "type over ggml candidates: down_proj=q4_k (repeatable)", list[str], tuple, list),
    Flag("tie", ("allocation.tie",), "fused layers (q/k/v, gate/up) share one config", bool),
    Flag("candidates", ("allocation.candidates",), "affine (bits x group sizes), gguf (the ggml types llama.cpp "
         "loads, each offered only to layers whose row length allows it) or both; ggml layers are stored as their "
         "GGUF blocks and exported unchanged (docs/gguf.md)"),
    Flag("gguf_pre", ("gguf_pre",), "tokenizer.ggml.pre of the GGUF file a --target-size-mb over ggml candidates "
         "counts (pass the same --gguf-pre to mixbits export)"),
    Flag("plan", ("plan",), "quantize with this plan (JSON/YAML) instead of allocating one", Optional[Path]),
    Flag("quantizer", ("quantizer",), "gptq (with --gptq-clip: chosen by measurement), clip (clipping search "
         "alone) or rtn (round-to-nearest)"),
    Flag("damage", ("damage",), "follow: allocate on Fisher damage x the quantizer's gain over RTN; rtn: on the "
         "damage of round-to-nearest"),
    Flag("gain_rows", ("gain_rows",), "--damage follow: output rows per layer on which the quantizer's gain is "
         "measured, evenly strided (0: every row; exact per row, the gain's ratio estimated)", Optional[int]),
    Flag("damage_rows", ("damage_rows",), "ggml candidates: output rows per layer, evenly strided, on which each "
         "ggml type's Fisher damage is measured and scaled to the layer's rows (0: every row; the grid search costs "
         "per row; affine damage is always on every row)", Optional[int]),
    Flag("cache", ("use_cache",), "reuse damage tables cached under $MIXBITS_CACHE_DIR/sensitivity (default "
         "MIXBITS_HOME/cache)", bool),
    Flag("gptq_clip", ("gptq.clip",), "gptq: clip-search each group's scale (weighted by diag XᵀX) as it is "
         "reached", bool),
    Flag("gptq_act_order", ("gptq.act_order", "gptq.static_groups"), "gptq: process columns by descending diag "
         "XᵀX, with static groups (so every format stores the natural group layout exactly)", bool),
    _toggle("qat", "train", "then Block-AP of the mixed plan, starting from --quantizer's result"),
    Flag("qat_epochs", ("train.epochs",), "Block-AP base epochs per block", float),
    Flag("qat_train_size", ("train.train_size",), "Block-AP training windows (EfficientQAT: 4096)", int),
    Flag("qat_val_size", ("train.val_size",), "validation windows that pick each block's best state", int),
    Flag("qat_seqlen", ("train.seqlen",), "tokens per training window (EfficientQAT: 2048)", int),
    Flag("qat_schedule", ("train.schedule",), "fixed, linear, sqrt, conservative or joint"),
    Flag("qat_total_epoch_budget", ("train.total_epoch_budget",), "rescale the schedule to the total epochs of "
         "fixed", bool),
    Flag("e2e", ("train.e2e",), "after Block-AP, train the step sizes end to end (E2E-QP)", bool),
    Flag("baselines", ("baselines",), "also quantize and score the uniform configs around the budget "
         "(--no-baselines: only the mixed model, e.g. to time the job)", bool),
    Flag("qat_baselines", ("train_baselines",), "also train the uniform baselines (comparison at equal training)",
         bool),
    Flag("resume", ("resume",), "continue a run after a crash or kill: the blocks of OUTPUT_DIR/model it finished "
         "are kept, and with --qat training continues from OUTPUT_DIR/checkpoint", bool),
    _toggle("iterative", "iterative", "instead of a budget: quantize the least sensitive units first, a few per "
            "step, until validation perplexity rises by --max-ppl-increase"),
    Flag("iterative_spec", ("iterative.spec",), "iterative: the config each unit moves to", str, _spec,
         lambda s: s.label),
    Flag("layers_per_iteration", ("iterative.layers_per_iteration",), "iterative: units quantized per step", int),
    Flag("max_ppl_increase", ("iterative.max_ppl_increase",), "iterative: relative limit (0.01 = 1 percent)",
         float),
    Flag("max_iterations", ("iterative.max_iterations",), "iterative: most steps", int),
    Flag("iterative_windows", ("iterative.windows",), "iterative: validation windows scored per step", int),
    Flag("tasks", ("tasks",), "zero-shot tasks through lm-eval, comma list: bb_* (embedded, offline) or lm-eval "
         "names such as piqa,arc_easy,hellaswag,winogrande (need the hub)", str, split_list, _join),
    Flag("task_limit", ("task_limit",), "documents per zero-shot task (default: all)", Optional[int]),
    Flag("report", ("report",), "write report.html and plots/ into OUTPUT_DIR", bool),
    Flag("compute_dtype", ("compute_dtype",), "float32, bfloat16 or float16 (default: float32 on CPU, the "
         "checkpoint's dtype on CUDA)", Optional[str]),
    Flag("max_memory", ("max_memory",), "memory budget in accelerate's format, e.g. cuda:0=20GiB,cpu=16GiB: the "
         "run predicts its peak first and refuses when it would not fit", Optional[str]),
    Flag("offload_dir", ("offload_dir",), "keep block-boundary activations on disk in this folder", Optional[Path]),
    Flag("stream", ("stream",), "work block by block from the checkpoint (--no-stream: the whole model in memory, "
         "the reference path)", bool),
    Flag("preload", ("preload",), "streamed: read the whole checkpoint into RAM once, in its own dtype, and cast "
         "blocks from there (no disk reads after the first; the peak grows by the checkpoint's bytes)", bool),
    Flag("overwrite", ("overwrite",), "replace an earlier mixbits output in the output folder as a whole (files "
         "mixbits did not write are kept); without it such a folder is refused", bool),
    Flag("device", ("device",), "auto, cpu, cuda, cuda:1 ..."),
]}

# Config fields set only in a recipe (no flag): the finer knobs of GPTQ and training, and progress
# (the CLI shows progress bars with --verbose, the library default).
RECIPE_ONLY = (
    "gptq.damp", "gptq.block_size", "train.dataset", "train.init", "train.seed", "train.batch_size", "train.quant_lr",
    "train.weight_lr", "train.min_lr_factor", "train.weight_decay", "train.grad_clip", "train.patience",
    "train.max_nonfinite", "train.offload", "train.offload_dir", "train.e2e_epochs", "train.e2e_lr",
    "train.e2e_batch_size", "train.e2e_grad_clip", "progress",
)

# The shared options of the commands that build a RunConfig (run takes every flag).
SHARED = ("model", "output_dir", "dataset", "seqlen", "calib_windows", "eval_windows", "seed", "bits", "group_sizes",
          "min_bits", "max_bits", "keep", "pin", "tie", "quantizer", "damage", "cache", "gptq_clip",
          "gptq_act_order", "overwrite", "device")

FLAG_OF: dict[str, str] = {path: "--" + f.name.replace("_", "-") for f in FLAGS.values() for path in f.paths}


def flags_in(message: str) -> str:
    """`message` with each config field in backticks (`` `data.seqlen` ``) shown as its flag (--seqlen)."""
    return re.sub(r"`([\w.]+)`", lambda m: FLAG_OF.get(m.group(1), m.group(0)), message)


def _current(cfg: RunConfig, path: str) -> object:
    """The value at `path`, a section that is off read as its defaults (so `--qat-epochs` shows 2.0)."""
    obj: object = cfg
    for i, name in enumerate(path.split(".")):
        value = getattr(obj, name)
        if value is None and i == 0 and name in SECTIONS and "." in path:
            value = SECTIONS[name]()
        obj = value
    return obj


@dataclass(frozen=True)
class RunOptions:
    """The run options of one command line: the flags typed (field path -> value), the recipe, the base."""

    base: RunConfig
    typed: dict[str, object] = field(default_factory=dict)  # flag name -> value, only those typed
    recipe: Path | None = None

    def config(self, fields: dict[str, object] | None = None) -> RunConfig:
        """The RunConfig: the recipe (else the base), then the typed flags, then `fields` (the command's own)."""
        cfg = load_recipe(self.recipe, self.base) if self.recipe is not None else self.base
        flat: dict[str, object] = {}
        for name, value in self.typed.items():
            flag = FLAGS[name]
            value = flag.parse(value) if flag.parse is not None and value is not None else value
            flat.update({path: value for path in flag.paths})
        return with_fields(cfg, {**flat, **(fields or {})})


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave the option `name` (click's parameter source: COMMANDLINE or ENVIRONMENT, not
    DEFAULT; typer vendors click, so the enum is compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def option(name: str, base: RunConfig = RunConfig()):
    """The typer option of the flag `name` alone, its default read from `base` (for commands that take a
    few of the run's flags without building a RunConfig: analyze, train)."""
    f = FLAGS[name]
    value = _current(base, f.paths[0])
    return typer.Option(f.show(value) if f.show is not None else value, help=f.help)


RECIPE_HELP = ("a YAML recipe (the fields of RunConfig: data:, allocation:, gptq:, train: ...; a run folder's "
               "recipe.yaml repeats that run); flags given here override its fields")


def _parameters(flags: list[Flag], base: RunConfig, helps: dict[str, str], recipe: bool) -> list[inspect.Parameter]:
    """The typer parameters of `flags` (each default read from `base`), after the context and --recipe."""
    kw = inspect.Parameter.KEYWORD_ONLY
    out = [inspect.Parameter("ctx", kw, annotation=typer.Context)]
    if recipe:
        out.append(inspect.Parameter("recipe", kw, annotation=Optional[Path],
                                     default=typer.Option(None, help=RECIPE_HELP)))
    for f in flags:
        value = _current(base, f.paths[0])
        default = typer.Option(f.show(value) if f.show is not None else value, help=helps.get(f.name, f.help))
        out.append(inspect.Parameter(f.name, kw, annotation=f.kind, default=default))
    return out


def run_options(names: Iterable[str] = tuple(FLAGS), *, base: RunConfig = RunConfig(),
                helps: dict[str, str] | None = None, recipe: bool = True):
    """Decorate a typer command with the flags `names` (defaults read from `base`) and --recipe; the
    command takes a parameter `options: RunOptions` instead of them (its own parameters stay)."""
    flags = [FLAGS[n] for n in names]

    def decorate(fn):
        def take(kwargs: dict) -> RunOptions:
            ctx: typer.Context = kwargs.pop("ctx")
            values = {f.name: kwargs.pop(f.name) for f in flags}
            typed = {n: v for n, v in values.items() if _typed(ctx, n)}
            return RunOptions(base, typed, kwargs.pop("recipe", None))

        return with_parameters(fn, _parameters(flags, base, helps or {}, recipe), take)

    return decorate
