"""Every export format by name, what each can express, and one `export` entry point.

    native      mixbits' packed safetensors (`load_native`); stores every plan, ggml types as their blocks
    gptq        GPTQ v1 with per-module `dynamic` overrides (GPTQModel, vLLM, SGLang); 2/3/4/8 bits
    compressed  compressed-tensors pack-quantized (vLLM; transformers for symmetric plans); 4/8 bits
    gguf        llama.cpp / Ollama: one ggml type per tensor, K-quants Q2_K..Q6_K (ggml-type plans,
                rows of 256) and Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (also from 4/5/8-bit affine specs); docs/gguf.md

`expressible` lists the layers a format cannot store (empty: the plan can be written as is),
`nearest_plan` gives the closest plan it can, and `export` checks first and writes second,
always through a staged temporary that is renamed into place, so a refused plan or a crash
never leaves a partial file. Writers share one signature:
`writer(model, plan, path, tokenizer=None, qparams=None, **options) -> Path`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from torch import nn

from mixbits.export import compressed, gguf, gptq
from mixbits.export.native import save_native
from mixbits.export.rules import ExportError, Problem, Rules, nearest_plan as _nearest_plan, problems
from mixbits.model.arch import find_linears, tied_groups
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.spec import GGML_TYPES, QUANT_BITS

__all__ = ["FORMATS", "ExportError", "ExportFormat", "Problem", "expressible", "export", "fused_groups", "nearest_plan"]


def _write_native(model, plan, path, tokenizer=None, qparams=None) -> Path:
    save_native(model, plan, path, tokenizer=tokenizer, qparams=qparams)
    return Path(path)


@dataclass(frozen=True)
class ExportFormat:
    """A format: its rules, its writer, the file name it writes inside a folder (None: a folder)."""

    name: str
    rules: Rules
    writer: Callable[..., Path]
    file_name: str | None
    description: str


FORMATS: Mapping[str, ExportFormat] = MappingProxyType({
    "native": ExportFormat("native", Rules("native", bits=QUANT_BITS, ggml_types=tuple(GGML_TYPES)), _write_native,
                           None, "mixbits' packed safetensors; every plan (ggml types as their blocks); load with "
                           "mixbits.export.native.load_native"),
    "gptq": ExportFormat("gptq", gptq.RULES, gptq.write_gptq, None,
                         "GPTQ v1 + per-module dynamic (GPTQModel, vLLM, SGLang); 2/3/4/8 bits"),
    "compressed": ExportFormat("compressed", compressed.RULES, compressed.write_compressed, None,
                               "compressed-tensors pack-quantized (vLLM; transformers for symmetric plans); 4/8 bits"),
    "gguf": ExportFormat("gguf", gguf.RULES, gguf.write_gguf, "model.gguf",
                         "GGUF Q2_K..Q6_K, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, F16 (llama.cpp, Ollama, transformers)"),
})


def get_format(fmt: str) -> ExportFormat:
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The groups of linears engines fuse (q/k/v, gate/up) in `model`."""
    return [g for g in tied_groups(model, find_linears(model)) if len(g) > 1]


def expressible(
    fmt: str, plan: Plan, shapes: Mapping[str, tuple[int, int]], fused: Sequence[Sequence[str]] = ()
) -> list[Problem]:
    """What `fmt` cannot store of `plan` (shapes: layer -> (out, in)); empty when it can store all."""
    return problems(get_format(fmt).rules, plan, shapes, fused)


def nearest_plan(
    fmt: str, plan: Plan, shapes: Mapping[str, tuple[int, int]], fused: Sequence[Sequence[str]] = ()
) -> Plan:
    """The plan closest to `plan` that `fmt` can store (bits rounded up; see `rules`)."""
    return _nearest_plan(get_format(fmt).rules, plan, shapes, fused)


def export(
    model: nn.Module,
    plan: Plan,
    path: str | Path,
    fmt: str,
    tokenizer=None,
    qparams: Mapping[str, QParams] | None = None,
    **options,
) -> Path:
    """Write `model` quantized by `plan` in format `fmt`; returns the path written.

    `path` is the output folder; for a single-file format (gguf) a path ending in the format's
    suffix is the file itself, any other path a folder that receives `model.gguf`.
    `options` go to the writer: gptq `checkpoint_format`, gguf `regroup` and `tokenizer_pre`.
    """
    chosen = get_format(fmt)
    path = Path(path)
    if chosen.file_name is not None and path.suffix != Path(chosen.file_name).suffix:
        path = path / chosen.file_name
    return chosen.writer(model, plan, path, tokenizer, qparams, **options)
