"""`mixbits export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mixbits.cli.common import (
    user_errors,
    app, console, setup_logging, VERBOSE,
)


EXPORT_FORMATS = ("native", "gptq", "compressed", "gguf")


@app.command("export")
def export_cmd(
    fmt: str = typer.Option(..., "--format", "-f", help=f"one of {', '.join(EXPORT_FORMATS)}"),
    run_dir: Path = typer.Option(..., help="output folder of `mixbits run` (holds model/ and results.json)"),
    out: Optional[Path] = typer.Option(None, help="where to write; default RUN_DIR/export-FORMAT (gguf: .../model.gguf)"),
    nearest: bool = typer.Option(False, help="if the format cannot store the plan, export the nearest plan it can "
                                             "(bits rounded up; changed layers re-quantized from the original model)"),
    gptq_format: str = typer.Option("gptq", help="GPTQ checkpoint_format: gptq (v1, widest support) or gptq_v2"),
    gguf_regroup: str = typer.Option("repeat", help="GGUF: repeat (keep the plan's codes and scales) or "
                                                    "requantize (fresh min-max per 32-block)"),
    gguf_pre: str = typer.Option("default", help="GGUF tokenizer.ggml.pre for llama.cpp, e.g. smollm, llama-bpe"),
    verbose: bool = VERBOSE,
) -> None:
    """Write a run's model in a format an inference engine loads, keeping its codes and scales."""
    setup_logging(verbose)
    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"--format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    from mixbits.export.formats import expressible, export as export_model, fused_groups
    from mixbits.export.from_native import load_for_export
    from mixbits.export.roundtrip import source_for
    from mixbits.model.apply import layer_shapes
    from mixbits.model.load import load_model

    options = {"gptq": {"checkpoint_format": gptq_format},
               "gguf": {"regroup": gguf_regroup, "tokenizer_pre": gguf_pre}}.get(fmt, {})
    target = out or run_dir / f"export-{fmt}"
    with user_errors():
        source = load_for_export(run_dir / "model")
        shapes, fused = layer_shapes(source.model), fused_groups(source.model)
        if nearest and expressible(fmt, source.plan, shapes, fused):
            name = json.loads((run_dir / "results.json").read_text())["config"]["model"]
            original, _ = load_model(name)
            source, changed = source_for(fmt, source, original)
            console.print(f"the plan was adjusted to what {fmt} stores (bits rounded up); {changed} changed layers "
                          "re-quantized")
        path = export_model(source.model, source.plan, target, fmt, source.tokenizer, source.qparams, **options)
        if nearest and path.is_file():  # folder formats record their plan in mixbits-export.json / mixbits.json
            source.plan.save(path.with_suffix(".plan.json"))
    console.print(f"wrote {path}")
