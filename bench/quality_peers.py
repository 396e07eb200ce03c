"""GPTQModel and torchao rows of the quality benchmark: each tool quantizes the original weights
its own way, with its own recommended settings, and the result is scored like every other row.

GPTQModel (optional; not installable beside torch 2.13 with its dependencies, so it is put on
PYTHONPATH with `pip install --no-deps --target $GPTQMODEL_DIR ...`, README "Export formats"):
`GPTQModel.load(original, QuantizeConfig(bits=b, group_size=128, mse=m))` then `.quantize()` on the
very calibration windows mixbits calibrates on (token ids, no re-tokenization), its defaults
otherwise (symmetric, act-group-aware ordering, damp 0.05, true-sequential), saved as GPTQ v1;
m = 0 (its default: each group's min-max range) and m = 2.4 (its grid search of each group's
range under the L2.4 error, what the GPTQ authors' code offers as `--mse`; mixbits' GPTQ clips too).
The saved folder is read back by mixbits' plain GPTQ unpacker (`export.gptq_reference`) into a
float32 model, so the row measures the quantizer, not GPTQModel's float16 CPU kernel.
Its bytes: every tensor the file stores for the block linears (qweight, qzeros, scales, g_idx).
GPTQModel sizes its CPU worker pool from the core count and refuses 2-core machines unless
GPTQMODEL_CPU_WORKERS is set; it is set to 2 here when absent.

torchao (optional, any torchao whose wheel loads beside this torch; on PYTHONPATH):
`quantize_(model, IntxWeightOnlyConfig(torch.intN, PerGroup(g), ...))` on the block linears of a
copy of the original (other tensors rounded to fp16, as every row stores them), for N in 2/3/4
and g in 32/64/128, with asymmetric min-max parameters and with symmetric HQQ scale-only
parameters (torchao's two choices of parameters), fp16 scales; and `Int8WeightOnlyConfig()`
(per-channel int8). torchao's grouping needs whole groups per row: a group size that does not
divide every layer's input width does not apply and its row says so. Its bytes are the nominal
packed size: N-bit codes, fp16 scales, int8 zero-points for the asymmetric variant (torchao's
CPU tensor keeps the codes unpacked in int8, 8 bits per weight in memory; packed kernels store N).
"""

from __future__ import annotations

import copy
import os
import shutil
from importlib import metadata

import torch
from safetensors import safe_open

from quality_rows import Built, NotRun, Row
from mixbits.export.gptq_reference import load_gptq_reference
from mixbits.model.apply import round_to_storage
from mixbits.model.load import resolve_model_source
from mixbits.plan import Plan

GPTQ_BITS = (2, 3, 4)
GPTQ_MSE = (0.0, 2.4)  # its default (min-max group range) and its clip search with the L2.4 error the GPTQ paper's code used
TORCHAO_BITS = (2, 3, 4)
TORCHAO_GROUPS = (32, 64, 128)
TORCHAO_VARIANTS = ("asymmetric", "symmetric-hqq")


def _import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as err:
        raise NotRun(f"gptqmodel is not importable ({err}); install it with `pip install --no-deps --target "
                     "$GPTQMODEL_DIR gptqmodel pypcre logbar tokenicer device-smi defuser threadpoolctl` "
                     "and run with PYTHONPATH=$GPTQMODEL_DIR") from None
    return GPTQModel, QuantizeConfig


def _gptq_folder_bytes(folder, layers) -> int:
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key.rpartition(".")[0] in layers:
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def gptqmodel_rows(bench) -> list[Row]:
    rows = []
    for mse in GPTQ_MSE:
        for bits in GPTQ_BITS:
            label = f"w{bits}g128" + (f" mse{mse:g}" if mse else "")
            row = Row("gptqmodel", label, {"bits": bits, "group_size": 128, "calibration": "the same windows"},
                      lambda: None)
            row.build = _gptqmodel_builder(bench, row, bits, 128, mse)
            rows.append(row)
    return rows


def _gptqmodel_builder(bench, row: Row, bits: int, group: int, mse: float):
    def build() -> Built:
        GPTQModel, QuantizeConfig = _import_gptqmodel()
        folder = bench.out / "gptqmodel" / row.label.replace(" ", "-")
        if not (folder / "config.json").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            qcfg = QuantizeConfig(bits=bits, group_size=group, mse=mse)
            model = GPTQModel.load(resolve_model_source(bench.args.model), qcfg, device="cpu")
            ids = bench.calib.tolist()
            model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in ids], batch_size=1)
            model.save(str(tmp))
            del model
            tmp.rename(folder)
        model, qcfg = load_gptq_reference(folder)
        keep = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
        row.settings |= {k: qcfg.get(k) for k in keep} | {
            k: qcfg.get("meta", {}).get(k) for k in ("act_group_aware", "damp_percent", "true_sequential", "mse")}
        row.settings["gptqmodel"] = metadata.version("gptqmodel")
        n_bytes = _gptq_folder_bytes(folder, set(bench.p.shapes))
        return Built(model.eval(), n_bytes, {"folder": str(folder.relative_to(bench.out)),
                                             "loaded_by": "mixbits export.gptq_reference (float32)"})

    return build


def _import_torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    except ImportError as err:
        raise NotRun(f"torchao is not importable ({err}); `pip install --no-deps --target $TORCHAO_DIR torchao` "
                     "and run with PYTHONPATH=$TORCHAO_DIR") from None
    return Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_


def _torchao_config(bits: int | None, group: int | None, variant: str | None):
    Int8WeightOnlyConfig, IntxWeightOnlyConfig, _ = _import_torchao()
    if bits is None:
        return Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm as Algorithm,
    )

    mapping, algorithm = ((MappingType.ASYMMETRIC, Algorithm.AFFINE) if variant == "asymmetric"
                          else (MappingType.SYMMETRIC, Algorithm.HQQ_SCALE_ONLY))
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group),
                                mapping_type=mapping, intx_choose_qparams_algorithm=algorithm, scale_dtype=torch.float16)


def _torchao_bytes(model, layers, bits: int, asymmetric: bool) -> int:
    total = 0
    for name in layers:
        w = model.get_submodule(name).weight
        total += w.qdata.numel() * bits // 8 + w.scale.numel() * w.scale.element_size()
        if asymmetric:
            total += w.zero_point.numel() * w.zero_point.element_size()
    return total


def torchao_rows(bench) -> list[Row]:
    specs = [(b, g, v) for b in TORCHAO_BITS for g in TORCHAO_GROUPS for v in TORCHAO_VARIANTS] + [(None, None, None)]
    rows = []
    for bits, group, variant in specs:
        label = "int8 per-channel" if bits is None else f"int{bits} g{group} {variant}"
        settings = ({"config": "Int8WeightOnlyConfig()"} if bits is None else
                    {"config": f"IntxWeightOnlyConfig(int{bits}, PerGroup({group}))", "variant": variant,
                     "scale_dtype": "float16"})
        row = Row("torchao", label, settings, lambda: None)
        row.build = _torchao_builder(bench, row, bits, group, variant)
        rows.append(row)
    return rows


def _torchao_builder(bench, row: Row, bits: int | None, group: int | None, variant: str | None):
    def build() -> Built:
        config = _torchao_config(bits, group, variant)
        quantize_ = _import_torchao()[2]
        ragged = [n for n, (_, i) in bench.p.shapes.items() if group is not None and i % group]
        if ragged:
            widths = sorted({bench.p.shapes[n][1] for n in ragged})
            raise NotRun(f"PerGroup({group}) needs whole groups; {len(ragged)} linears have {widths} inputs, "
                         f"not a multiple of {group}")
        model = copy.deepcopy(bench.p.model)
        round_to_storage(model, Plan({}))
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in bench.p.shapes)
        row.settings["torchao"] = metadata.version("torchao")
        n_bytes = _torchao_bytes(model, bench.p.shapes, bits or 8, variant == "asymmetric")
        return Built(model.eval(), n_bytes, {"bytes": "nominal packed size (codes at their bits)"})

    return build
