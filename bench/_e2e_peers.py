"""One peer tool's whole quantization job, run as its own process by bench/end_to_end.py.

    python bench/_e2e_peers.py gptqmodel JOB.json
    python bench/_e2e_peers.py torchao JOB.json

JOB.json: {"model": HF folder, "out": folder to write, "calibration": [[token ids], ...],
"bits": N, "group": G, "mse": GPTQModel's clip-search norm (0: off), "variant": "asymmetric" |
"symmetric-hqq" (torchao), "device": "cpu" | "cuda"}. Each job does what
that tool's users do, start to finish: load the original checkpoint, quantize, save the result.
Nothing of mixbits is imported here, so the process pays only for the peer's own imports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def gptqmodel(job: dict) -> None:
    """GPTQModel's README recipe: load with a QuantizeConfig, quantize on calibration rows, save."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses fewer than 4 cores otherwise
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=job["bits"], group_size=job["group"], mse=job.get("mse", 0.0))
    model = GPTQModel.load(job["model"], config, device=job.get("device", "cpu"))
    model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in job["calibration"]], batch_size=1)
    model.save(job["out"])


def torchao(job: dict) -> None:
    """torchao's recipe: load in float, `quantize_` the block linears, save the state dict."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm as Algorithm,
    )
    from transformers import AutoModelForCausalLM

    mapping, algorithm = ((MappingType.ASYMMETRIC, Algorithm.AFFINE) if job["variant"] == "asymmetric"
                          else (MappingType.SYMMETRIC, Algorithm.HQQ_SCALE_ONLY))
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{job['bits']}"), granularity=PerGroup(job["group"]),
                                  mapping_type=mapping, intx_choose_qparams_algorithm=algorithm,
                                  scale_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32).to(job.get("device", "cpu"))
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and ".layers." in fqn)
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(job["out"]) / "model.pt")


JOBS = {"gptqmodel": gptqmodel, "torchao": torchao}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in JOBS:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(JOBS)}}} JOB.json")
    JOBS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
