"""The Python API: quantize a model from a notebook or a script, evaluate it, save it, load it back.

    import mixbits

    qm = mixbits.quantize("smollm2-135m", target_bpw=4.25, quantizer="rtn")
    qm.plan                      # layer -> QuantSpec (mixbits.plan.Plan)
    qm.evaluate()                # {"ppl": ..., "kl": ..., "top1": ..., "original_ppl": ...} on held-out wiki
    qm.save("out/model")         # native; format="gptq" | "compressed" | "gguf" for inference engines
    mixbits.load("out/model").model.generate(...)

`quantize` runs the stages of `mixbits run` (`mixbits.pipeline`: prepare, sensitivity,
allocate_optimal, quantize_model) on one model, without the uniform baselines, the result files
or the report; so the same model, calibration tokens and settings give the plan `mixbits run`
gives. It takes an embedded name, a local Hugging Face folder, a hub id, or a model already
loaded with `transformers` (then pass its tokenizer too).

Memory: the returned `QuantizedModel` holds the quantized model and the original (float32, kept
for `evaluate`'s KL and top-1 and for `save(..., nearest=True)`), so twice the model's size;
`drop_original()` frees it. GPTQ also keeps one block's captured activations at a time.
For a model whose float32 copy does not fit in memory, `mixbits.commands.run` (what `mixbits run`
calls) streams the checkpoint block by block into a folder, and `load` reads the packed model back.
Errors for bad arguments are `mixbits.errors.UserError`, naming the argument.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixbits.errors import UserError

if TYPE_CHECKING:  # torch and transformers load inside the functions: `import mixbits` stays cheap
    import torch
    from torch import nn

    from mixbits.plan import Plan

__all__ = ["QuantizedModel", "load", "quantize"]

FORMAT_NAMES = ("native", "gptq", "compressed", "gguf")


@dataclass(eq=False)
class QuantizedModel:
    """A quantized model with its plan; made by `quantize` or `load`.

    model: the quantized torch model (`generate` works as on any transformers model).
    plan: the bit plan, layer name -> QuantSpec. tokenizer: the model's tokenizer, or None.
    original: the unquantized model (None after `load` or `drop_original`).
    qparams: per planned layer the scales and zero-points that reproduce its codes exactly.
    shapes: per block linear (out_features, in_features). info: quantizer, budget, seconds per stage.
    """

    model: nn.Module
    plan: Plan
    tokenizer: object | None = None
    original: nn.Module | None = None
    qparams: dict = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    seqlen: int = 512
    device: str = "cpu"
    info: dict = field(default_factory=dict)
    source: Path | None = None  # the native folder `load` read (exports re-read its codes from there)

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight over the block linears, as the cost model counts them."""
        return self.plan.bits_per_weight(self.shapes)

    def __repr__(self) -> str:
        n = len(self.plan.quantized())
        return (f"QuantizedModel({type(self.model).__name__}, {self.bits_per_weight:.3f} bpw, "
                f"{n}/{len(self.shapes)} linears quantized, quantizer={self.info.get('quantizer')!r})")

    def drop_original(self) -> None:
        """Free the original model (evaluate then reports perplexity only)."""
        self.original = None

    def evaluate(self, data="wiki", *, max_windows: int | None = 24, seqlen: int | None = None,
                 progress: bool = False) -> dict:
        """Perplexity of the quantized model, and KL divergence and top-1 agreement to the original,
        all on the same held-out tokens (`mixbits.eval.perplexity`).

        data: a text name (`wiki`, `canterbury`, ...) or a .txt/.jsonl path, whose *test* split is
        read; a list of documents; or token windows, a LongTensor [n, seqlen].
        max_windows: the first windows only (None: all). seqlen: tokens per window (default: the
        calibration's). Returns {"ppl", "nll", "kl", "top1", "original_ppl", "tokens", "windows",
        "seqlen"}; kl, top1 and original_ppl are None without the original.

            >>> qm.evaluate("wiki", max_windows=8)["ppl"]
        """
        from mixbits.config import resolve_device
        from mixbits.eval.perplexity import evaluate_models

        if max_windows is not None and max_windows < 1:
            raise UserError(f"max_windows={max_windows!r} must be at least 1, or None for every window")
        windows = _windows(data, self.tokenizer, seqlen or self.seqlen, max_windows, split="test", arg="data")
        models = {"quantized": self.model}
        if self.original is not None:
            models["original"] = self.original
        results = evaluate_models(models, windows, device=resolve_device(self.device),
                                  reference="original" if self.original is not None else None, progress=progress)
        out = results["quantized"].to_dict()
        out["original_ppl"] = results["original"].ppl if self.original is not None else None
        return out

    def save(self, path: str | Path, format: str = "native", *, nearest: bool = False, **options) -> Path:
        """Write the model in `format` and return the path written.

        format: `native` (mixbits' packed safetensors; `mixbits.load` reads it back exactly),
        `gptq`, `compressed` or `gguf` (see `mixbits.export.formats`). A plan the format cannot
        store is refused with the layers named; nearest=True writes the nearest plan it can
        (changed layers re-quantized from the original). options: gptq `checkpoint_format`,
        gguf `regroup` and `tokenizer_pre`.

            >>> qm.save("out/model")                       # folder: one shard per block, index, mixbits.json, config
            >>> qm.save("out/gguf", format="gguf", nearest=True)
        """
        from mixbits.export.formats import export
        from mixbits.export.roundtrip import source_for

        if format not in FORMAT_NAMES:
            raise UserError(f"format={format!r} is not one of {', '.join(FORMAT_NAMES)}")
        source = self._export_source()
        if nearest:
            source, _ = source_for(format, source, self.original)
        return export(source.model, source.plan, Path(path), format, source.tokenizer, source.qparams, **options)

    def _export_source(self):
        from mixbits.export.from_native import ExportSource, load_for_export

        if self.source is not None:  # loaded: the packed layers are re-read as plain weights + their qparams
            return load_for_export(self.source)
        return ExportSource(self.model, self.plan, self.qparams, self.tokenizer)


def quantize(
    model,
    *,
    target_bpw: float | None = None,
    target_size_mb: float | None = None,
    calibration="wiki",
    quantizer: str = "gptq",
    tokenizer=None,
    seqlen: int = 512,
    calib_windows: int = 16,
    seed: int = 0,
    bits: Sequence[int] | None = None,
    group_sizes: Sequence[int | None] | None = None,
    device: str = "auto",
    use_cache: bool = True,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize `model` to a budget with a mixed-precision plan; returns a `QuantizedModel`.

    model: an embedded name (`smollm2-135m`), a local Hugging Face folder, a hub id, or a
    model object loaded with transformers (then give `tokenizer`, unless `calibration` is token
    windows). It is not modified, but it is moved to `device`.
    target_bpw / target_size_mb: the budget, average stored bits per weight over the block linears
    or megabytes of the whole saved model; give one (neither: 3.25 bpw, as `mixbits run`).
    calibration: a text name (`wiki`, `canterbury`, `wikitext2`, `c4`) or a .txt/.jsonl path, whose
    calibration split is read; a list of documents; or token windows, a LongTensor [n, seqlen].
    From text, `calib_windows` windows of `seqlen` tokens are drawn with `seed`.
    quantizer: `rtn` (no data, fastest), `clip` or `gptq` (the default, best measured).
    bits / group_sizes: candidate configs (default 2,3,4,5,6,8 bits x groups 64,128).
    device: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`. use_cache: reuse damage tables
    cached under MIXBITS_HOME for the same weights, tokens and configs.

        >>> qm = mixbits.quantize("smollm2-135m", target_bpw=4.25, quantizer="rtn")
        >>> qm = mixbits.quantize(hf_model, tokenizer=hf_tokenizer, target_size_mb=110,
        ...                       calibration=["my text ...", "another document ..."], seqlen=256)
    """
    from mixbits import pipeline
    from mixbits.allocate.optimal import allocate_optimal
    from mixbits.model.quantize import quantize_model
    from mixbits.plan import Plan
    from mixbits.timing import StageTimer

    name, loaded = _model_argument(model, tokenizer, calibration)
    cfg = _run_config(name, target_bpw, target_size_mb, calibration, quantizer, seqlen, calib_windows, seed, bits,
                      group_sizes, device, use_cache, progress)
    timer = StageTimer()
    p = pipeline.prepare(cfg, timer, loaded=loaded)
    with timer.stage("data"):
        calib = _windows(calibration, p.tokenizer, seqlen, calib_windows, split="calibration", arg="calibration",
                         seed=seed)
    info = _data_info(calibration, calib, seed)
    table = pipeline.sensitivity(cfg, p, calib, timer, info)
    with timer.stage("allocate"):
        specs, _ = allocate_optimal(table, p.groups, p.budget_bits, p.constraints)
    plan = Plan(specs, {"strategy": "optimal", "budget": p.budget.label, "sensitivity": table.method})
    with timer.stage("quantize"):
        q_model, report = quantize_model(p.model, plan, quantizer=quantizer,
                                         windows=None if quantizer == "rtn" else calib, device=p.device,
                                         progress=progress, gptq=cfg.gptq)
    return QuantizedModel(
        model=q_model, plan=plan, tokenizer=p.tokenizer, original=p.model, qparams=dict(report.qparams),
        shapes=dict(p.shapes), seqlen=calib.shape[1], device=str(p.device),
        info={"model": name, "quantizer": quantizer, "budget": p.budget.label, "calibration": info["calibration"],
              "seconds": dict(timer.seconds)},
    )


def load(path: str | Path, *, device: str = "cpu") -> QuantizedModel:
    """A model saved in the native format (`QuantizedModel.save(path)` or `mixbits run`'s
    `<output-dir>/model`), with its plan and tokenizer; packed layers stay packed (`QuantLinear`).

        >>> qm = mixbits.load("runs/quick/model")
        >>> qm.evaluate("wiki")["ppl"]
    """
    import torch

    from mixbits.config import resolve_device
    from mixbits.export.from_native import saved_tokenizer
    from mixbits.export.native import load_native
    from mixbits.plan import Plan

    folder = Path(path).expanduser()
    meta_file = folder / "mixbits.json"
    if not meta_file.is_file():
        raise UserError(f"path={str(path)!r} is not a mixbits native folder (no mixbits.json); write one with "
                        "QuantizedModel.save(path) or `mixbits run` (<output-dir>/model)")
    plan = Plan.from_dict(json.loads(meta_file.read_text()).get("plan"), source=str(meta_file))
    model = load_native(folder, device=resolve_device(device), dtype=torch.float32)
    return QuantizedModel(model=model, plan=plan, tokenizer=saved_tokenizer(folder), shapes=_block_shapes(model),
                          device=device, info={"model": str(folder)}, source=folder)


def _block_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear, packed ones included (`find_linears` sees plain linears only)."""
    from torch import nn

    from mixbits.model.arch import find_blocks
    from mixbits.quant.qlinear import QuantLinear

    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{sub}": (m.out_features, m.in_features)
            for i, block in enumerate(blocks) for sub, m in block.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear))}


def _model_argument(model, tokenizer, calibration):
    """(name for the records, (model, tokenizer) when already loaded else None)."""
    import torch
    from torch import nn

    if isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise UserError("tokenizer= is only for a model object; a name or folder brings its own tokenizer")
        return str(model), None
    if not isinstance(model, nn.Module):
        raise UserError(f"model= must be a name, a folder or a loaded transformers model, not {type(model).__name__}")
    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        raise UserError("tokenizer= is needed with a loaded model (to tokenize the calibration text); pass the "
                        "model's tokenizer, or token windows as calibration=")
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name) or f"in-memory {type(model).__name__}", (model, tokenizer)


def _run_config(name, target_bpw, target_size_mb, calibration, quantizer, seqlen, calib_windows, seed, bits,
                group_sizes, device, use_cache, progress):
    """The `RunConfig` of `mixbits run` with the same settings; arguments checked by their names first."""
    from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, QUANTIZERS, AllocationConfig, DataConfig, RunConfig

    if quantizer not in QUANTIZERS:
        raise UserError(f"quantizer={quantizer!r} is not one of {', '.join(QUANTIZERS)}")
    if target_bpw is not None and target_size_mb is not None:
        raise UserError(f"give one budget: target_bpw={target_bpw!r} or target_size_mb={target_size_mb!r}, not both")
    if target_bpw is None and target_size_mb is None:
        target_bpw = 3.25
    for arg, value in (("target_bpw", target_bpw), ("target_size_mb", target_size_mb)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"{arg}={value!r} must be a positive number")
    for arg, value, low in (("seqlen", seqlen, 16), ("calib_windows", calib_windows, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"{arg}={value!r} must be an integer of at least {low}")
    dataset = calibration if isinstance(calibration, (str, Path)) else "wiki"  # else: checked by _windows
    if isinstance(calibration, (str, Path)):
        _check_text(calibration, "calibration")
    try:
        allocation = AllocationConfig(target_bpw=target_bpw, target_size_mb=target_size_mb,
                                      bits=tuple(bits or DEFAULT_BITS), group_sizes=tuple(group_sizes or DEFAULT_GROUPS))
    except ValueError as err:
        raise UserError(f"bits={bits!r} / group_sizes={group_sizes!r}: {err}") from err
    return RunConfig(model=name, output_dir=Path("."), device=device, quantizer=quantizer, use_cache=use_cache,
                     data=DataConfig(dataset=str(dataset), seqlen=seqlen, calib_windows=calib_windows, seed=seed),
                     allocation=allocation, baselines=False, report=False, progress=progress)


def _check_text(name, arg: str) -> None:
    from mixbits.data.text import resolve_text

    try:
        resolve_text(str(name))
    except UserError as err:
        raise UserError(f"{arg}={str(name)!r}: {err}") from err


def _windows(data, tokenizer, seqlen: int, count: int | None, *, split: str, arg: str, seed: int = 0):
    """Token windows [n, seqlen] from a text name or path, a list of documents, or windows as given.
    Calibration draws `count` windows at random offsets; evaluation takes the first `count`."""
    import torch

    from mixbits.data.text import load_text
    from mixbits.data.windows import calibration_windows, eval_windows

    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long or data.shape[1] < 2:
            raise UserError(f"{arg}= token windows must be a LongTensor [n, seqlen]; got {data.dtype} "
                            f"{tuple(data.shape)}")
        return data if count is None or split == "calibration" else data[:count]
    if isinstance(data, (str, Path)):
        _check_text(data, arg)
        docs = load_text(str(data), split)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        docs = list(data)
    else:
        raise UserError(f"{arg}= must be a text name or .txt/.jsonl path, a non-empty list of str, or a LongTensor "
                        f"[n, seqlen]; got {type(data).__name__}")
    if tokenizer is None:
        raise UserError(f"{arg}= is text, but the model has no tokenizer; pass token windows instead")
    try:
        if split == "calibration":
            return calibration_windows(tokenizer, docs, seqlen, count, seed)
        return eval_windows(tokenizer, docs, seqlen, count)
    except ValueError as err:  # text shorter than one window: name the argument and the fix
        raise UserError(f"{arg}=: {err}") from err


def _data_info(calibration, calib, seed: int) -> dict:
    from mixbits.data.windows import text_fingerprint

    what = str(calibration) if isinstance(calibration, (str, Path)) else type(calibration).__name__
    return {"calibration": {"source": what, "windows": len(calib), "seqlen": calib.shape[1], "tokens": calib.numel(),
                            "sha256": text_fingerprint(calib), "seed": seed}}
