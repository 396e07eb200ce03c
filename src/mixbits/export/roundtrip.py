"""Export a model in a format, load the files back through the engine that reads that format,
and score the loaded model beside the in-memory quantized model on the same token windows.

A *route* is one export (format + writer options) read by one loader; every loader gets the
path alone, nothing of the in-memory model:

    native       mixbits.export.native.load_native (packed QuantLinear modules)
    gptq         export.gptq_reference: a plain numpy unpacker of the GPTQ v1 files
    gptqmodel    GPTQModel.load, TorchLinear kernel in float16 (optional); a gptq_v2 checkpoint,
                 because GPTQModel refuses asymmetric v1 files that it did not write itself
    compressed   transformers from_pretrained for symmetric plans; asymmetric plans, which
                 transformers cannot load (see export/compressed.py), through compressed-tensors'
                 own PackedQuantizationCompressor.decompress, layer by layer
    gguf         transformers from_pretrained(gguf_file=...), which dequantizes to float
    llama.cpp    the same GGUF file run by llama.cpp itself (optional; eval/llamacpp.py)

`source_for` gives what `mixbits export --format F --nearest` writes: the run's plan, or where
F cannot store it the nearest plan F can (changed layers re-quantized from the original).
`in_memory_model` is that plan applied in memory as mixbits evaluates it, the reference that
every loaded model is compared with (perplexity, KL, top-1 via `eval.perplexity`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.eval.perplexity import evaluate_models
from mixbits.export.formats import export, expressible, fused_groups, get_format, nearest_plan
from mixbits.export.from_native import ExportSource, with_plan
from mixbits.export.native import load_native
from mixbits.model.apply import fake_quantize_model, layer_shapes, round_to_storage
from mixbits.plan import Plan

log = logging.getLogger(__name__)


def _load_native(path: Path, seqlen: int):
    return load_native(path)


def _load_gptq_reference(path: Path, seqlen: int):
    from mixbits.export.gptq_reference import load_gptq_reference

    return load_gptq_reference(path)[0]


def _load_gptqmodel(path: Path, seqlen: int):
    from gptqmodel import BACKEND, GPTQModel

    # the torch kernel is the one GPTQModel runs on CPU; it computes in float16 only
    return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH).model.eval()


def _symmetric(qcfg: dict) -> bool:
    return all(group["weights"]["symmetric"] for group in qcfg["config_groups"].values())


@torch.no_grad()
def _decompress_compressed(path: Path, qcfg: dict) -> nn.Module:
    """A float model filled layer by layer by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    scheme_of = {t: g for g in QuantizationConfig.model_validate(qcfg).config_groups.values() for t in g.targets}
    compressor = BaseCompressor.get_value_from_registry(qcfg["format"])
    tensors = load_file(str(path / "model.safetensors"))
    state = {k: v.float() for k, v in tensors.items() if k.rpartition(".")[0] not in scheme_of}
    for name, scheme in scheme_of.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        own["weight_scale"] = own["weight_scale"].float()
        state[f"{name}.weight"] = compressor.decompress(own, scheme)["weight"].float()
        if "bias" in own:
            state[f"{name}.bias"] = own["bias"].float()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def _compressed_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _compressed_engine(path: Path) -> str:
    if _symmetric(_compressed_config(path)):
        return "transformers from_pretrained"
    return "compressed-tensors decompressor (transformers cannot load asymmetric plans)"


def _load_compressed(path: Path, seqlen: int):
    from transformers import AutoModelForCausalLM

    qcfg = _compressed_config(path)
    if _symmetric(qcfg):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    log.info("%s is asymmetric: transformers cannot load it; decompressing with compressed-tensors", path)
    return _decompress_compressed(path, qcfg)


def _load_gguf_transformers(path: Path, seqlen: int):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _load_llamacpp(path: Path, seqlen: int):
    from mixbits.eval.llamacpp import LlamaCppLM

    return LlamaCppLM(path, n_ctx=seqlen)


@dataclass(frozen=True)
class Route:
    """One export read by one loader: `load(path, seqlen)` (llama.cpp sizes its context by the
    window length; the others ignore it). `engine` names what reads the files, or tells it from
    them. `requires`: an optional module the loader imports."""

    name: str
    fmt: str
    engine: str | Callable[[Path], str]
    load: Callable[[Path, int], object]
    options: Mapping[str, object] = field(default_factory=dict)
    requires: str | None = None

    @property
    def folder(self) -> str:
        """Where under the output folder this route's export goes (routes may share one)."""
        suffix = "-".join(str(v) for v in self.options.values())
        return f"{self.fmt}-{suffix}" if suffix else self.fmt


ROUTES: tuple[Route, ...] = (
    Route("native", "native", "mixbits load_native", _load_native),
    Route("gptq", "gptq", "plain reference unpacker (export/gptq_reference.py)", _load_gptq_reference,
          {"checkpoint_format": "gptq"}),
    Route("gptqmodel", "gptq", "GPTQModel.load, TorchLinear, fp16 (gptq_v2 file)", _load_gptqmodel,
          {"checkpoint_format": "gptq_v2"}, requires="gptqmodel"),
    Route("compressed", "compressed", _compressed_engine, _load_compressed),
    Route("gguf", "gguf", "transformers from_pretrained(gguf_file=...)", _load_gguf_transformers),
    Route("llama.cpp", "gguf", "llama.cpp (llama-cpp-python)", _load_llamacpp, requires="llama_cpp"),
)


def available(routes: Sequence[Route] = ROUTES) -> list[Route]:
    """The routes whose optional engine is importable here."""
    import importlib.util

    return [r for r in routes if r.requires is None or importlib.util.find_spec(r.requires) is not None]


def source_for(fmt: str, source: ExportSource, original: nn.Module | None) -> tuple[ExportSource, int]:
    """What `mixbits export --format fmt --nearest` writes, and how many layers changed."""
    shapes, fused = layer_shapes(source.model), fused_groups(source.model)
    if not expressible(fmt, source.plan, shapes, fused):
        return source, 0
    if original is None:
        raise UserError(f"{fmt} cannot store the plan as it is; pass the original model to export the nearest plan")
    plan = nearest_plan(fmt, source.plan, shapes, fused)
    changed = sum(plan.specs[n] != s for n, s in source.plan.specs.items())
    return with_plan(source, original, plan), changed


@torch.no_grad()
def in_memory_model(source: ExportSource) -> nn.Module:
    """`source.plan` applied in memory: layers with QParams already hold their dequantized
    weights, the others are fake-quantized (min-max) here; other tensors rounded to fp16."""
    model = copy.deepcopy(source.model)
    fresh = Plan({n: s for n, s in source.plan.quantized().items() if n not in source.qparams})
    fake_quantize_model(model, fresh, inplace=True, storage_dtype=None)
    round_to_storage(model, source.plan)
    return model


def bytes_on_disk(path: Path) -> int:
    """Bytes of the weights: the file itself, or a folder's *.safetensors."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def export_route(source: ExportSource, route: Route, out_dir: str | Path) -> Path:
    """Write `source` for `route` under `out_dir` (a file name inside for single-file formats)."""
    target = Path(out_dir) / route.folder
    if get_format(route.fmt).file_name is not None:
        target = target / get_format(route.fmt).file_name
    return export(source.model, source.plan, target, route.fmt, source.tokenizer, source.qparams, **route.options)


def measure_format(
    fmt: str,
    source: ExportSource,
    original: nn.Module | None,
    windows: torch.Tensor,
    out_dir: str | Path,
    routes: Sequence[Route] = ROUTES,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    """Export `source` for every route of `fmt`, load each back, and score it beside the
    in-memory model of the same plan on `windows` [n, seqlen]; one row per route."""
    chosen, changed = source_for(fmt, source, original)
    shapes = layer_shapes(chosen.model)
    models: dict[str, object] = {"in-memory": in_memory_model(chosen)}
    rows, written = [], {}
    for route in [r for r in routes if r.fmt == fmt]:
        if route.folder not in written:  # routes with the same writer options share one export
            written[route.folder] = export_route(chosen, route, out_dir)
        path = written[route.folder]
        engine = route.engine(path) if callable(route.engine) else route.engine
        log.info("%s: loading %s with %s", route.name, path, engine)
        models[route.name] = route.load(path, windows.shape[1])
        rows.append({"route": route.name, "format": fmt, "engine": engine, "path": str(path),
                     "bytes": bytes_on_disk(path), "nearest": changed > 0, "changed_layers": changed,
                     "bpw": chosen.plan.bits_per_weight(shapes), "options": dict(route.options)})
    results = evaluate_models(models, windows, device=device, reference="in-memory", progress=False)
    for row in rows:
        loaded, memory = results[row["route"]], results["in-memory"]
        row.update({"ppl_in_memory": memory.ppl, "ppl_loaded": loaded.ppl, "kl": loaded.kl, "top1": loaded.top1,
                    "tokens": loaded.tokens})
    for model in models.values():
        if hasattr(model, "close"):
            model.close()
    return rows
