"""`mixbits export`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from mixbits.cli.common import (
    user_errors,
    app, console, setup_logging, OVERWRITE, VERBOSE,
)
from mixbits.errors import UserError
from mixbits.outdir import EXPORT_KINDS, adopt, claim, claim_file
from mixbits.quant.spec import GGML_TYPES


EXPORT_FORMATS = ("native", "gptq", "compressed", "gguf")


@app.command("export")
def export_cmd(
    fmt: str = typer.Option(..., "--format", "-f", help=f"one of {', '.join(EXPORT_FORMATS)}; gguf writes one ggml "
                            f"type per tensor ({', '.join(GGML_TYPES)}; F16 where the plan keeps 16 bit), loaded by "
                            "llama.cpp, Ollama, LM Studio and transformers (docs/gguf.md)"),
    run_dir: Path = typer.Option(..., help="output folder of `mixbits run` (holds model/ and results.json)"),
    out: Optional[Path] = typer.Option(None, help="where to write; default RUN_DIR/export-FORMAT (gguf: .../model.gguf)"),
    nearest: bool = typer.Option(False, help="if the format cannot store the plan, export the nearest plan it can "
                                             "(bits rounded up; changed layers re-quantized from the original model)"),
    gptq_format: str = typer.Option("gptq", help="GPTQ checkpoint_format: gptq (v1, widest support) or gptq_v2"),
    gguf_regroup: str = typer.Option("repeat", help="GGUF: repeat (keep the plan's codes and scales) or "
                                                    "requantize (fresh min-max per 32-block)"),
    gguf_pre: str = typer.Option("default", help="GGUF tokenizer.ggml.pre for llama.cpp, e.g. smollm, llama-bpe"),
    overwrite: bool = OVERWRITE,
    verbose: bool = VERBOSE,
) -> None:
    """Write a run's model in a format an inference engine loads, keeping its codes and scales."""
    setup_logging(verbose)
    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"--format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    from mixbits.export.formats import expressible, export as export_model, fused_groups
    from mixbits.export.footprint import stored_parts
    from mixbits.export.from_native import load_for_export, stored_source
    from mixbits.export.streamed import export_stored
    from mixbits.export.roundtrip import source_for
    from mixbits.model.apply import layer_shapes
    from mixbits.model.load import load_model
    from mixbits.model.budget_stages import predict_export

    options = {"gptq": {"checkpoint_format": gptq_format},
               "gguf": {"regroup": gguf_regroup, "tokenizer_pre": gguf_pre}}.get(fmt, {})
    target = out or run_dir / f"export-{fmt}"
    with user_errors(), claim_output(target, run_dir, fmt, overwrite) as target:
        stored = stored_source(run_dir / "model")  # block by block, unless the plan must change
        shapes, fused = layer_shapes(stored.structure), fused_groups(stored.structure)
        plan = stored.plan
        if not (nearest and expressible(fmt, stored.plan, shapes, fused)):
            memory = predict_export(stored_parts(stored), fmt)  # from the headers: nothing read yet
            logging.getLogger(__name__).info("memory: %s", memory.describe())
            path = export_stored(stored, target, fmt, **options)
        else:
            source = load_for_export(run_dir / "model")
            name = json.loads((run_dir / "results.json").read_text())["config"]["model"]
            original, _ = load_model(name)
            source, changed = source_for(fmt, source, original)
            console.print(f"the plan was adjusted to what {fmt} stores (bits rounded up); {changed} changed layers "
                          "re-quantized")
            path, plan = export_model(source.model, source.plan, target, fmt, source.tokenizer, source.qparams,
                                      **options), source.plan
        if nearest and path.is_file():  # folder formats record their plan in mixbits-export.json / mixbits.json
            plan.save(path.with_suffix(".plan.json"))
    adopt(run_dir, path)  # an export inside the run folder goes when the run is replaced with --overwrite
    console.print(f"wrote {path}")


def refuse_run_folder(target: Path, run_dir: Path) -> None:
    """--out may not be the run folder, a folder containing it, or anything inside its model/."""
    t, r = target.resolve(), run_dir.resolve()
    if t == r or t in r.parents or t == r / "model" or (r / "model") in t.parents:
        raise UserError(f"--out {target} is the run folder {run_dir}, contains it, or lies in its model/; an export "
                        f"would replace the run's own files: choose another path, e.g. {run_dir / 'export'}")


@contextmanager
def claim_output(target: Path, run_dir: Path, fmt: str, overwrite: bool) -> Iterator[Path]:
    """Own the export's output (`mixbits.outdir`) before anything is loaded; yields the path to write:
    a folder, or for gguf the .gguf file (`model.gguf` inside a folder that is not one)."""
    from mixbits.export.formats import FORMATS
    from mixbits.export.gguf import is_mixbits_gguf

    refuse_run_folder(target, run_dir)
    file_name = FORMATS[fmt].file_name
    if file_name is None:
        with claim(target, fmt, overwrite=overwrite, staged=True, replaces=EXPORT_KINDS, flag="--out",
                   command=f"mixbits export --format {fmt}"):
            yield target
        return
    path = target if target.suffix == Path(file_name).suffix else target / file_name
    with claim_file(path, overwrite=overwrite, is_ours=is_mixbits_gguf, command=f"mixbits export --format {fmt}"):
        yield path
