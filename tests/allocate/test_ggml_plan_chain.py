"""The library chain a GGUF run takes: a Fisher damage table over the ggml candidates of a tiny
Llama whose rows are 256 (q/k/v/o, gate/up) and 576 (down_proj) wide, the exact allocation,
quantize_model, write_gguf. The plan gives K-quants only to 256-rows, meets its budget, and the
file stores every layer in its planned type (none moved) at the bytes the plan predicts."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.allocate.optimal import allocate_optimal, unit_groups
from mixbits.config import AllocationConfig
from mixbits.export.gguf import gguf_data_bytes, write_gguf
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_linears, tied_groups
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec
from mixbits.sensitivity.fisher import fisher_table
from mixbits.sensitivity.table import DamageTable
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import gguf_name


def test_fisher_allocation_over_gguf_types_writes_the_planned_file(tmp_path):
    tokenizer = make_tokenizer(make_text())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=576, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    linears = find_linears(model)
    shapes = layer_shapes(model)
    configs = AllocationConfig(target_bpw=5.0, candidates="gguf").configs()
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    damage, _ = fisher_table(model, windows, linears, configs, device=torch.device("cpu"), progress=False)
    table = DamageTable(tuple(linears), tuple(shapes[n] for n in linears), configs, damage, "fisher")
    numel = sum(o * i for o, i in shapes.values())
    budget = 5.0 * numel
    specs, _ = allocate_optimal(table, unit_groups(table.units, tied_groups(model, linears), True), budget)
    plan = Plan(specs)
    plan.validate(shapes)
    assert 8 * plan.storage_bytes(shapes) <= budget
    kquants = [n for n, s in specs.items() if isinstance(s, GGMLSpec) and s.block == 256]
    assert kquants and all(shapes[n][1] == 256 for n in kquants)
    assert all(isinstance(s, GGMLSpec) or s.keep for s in specs.values())

    quantized, report = quantize_model(model, plan, quantizer="rtn", device="cpu", progress=False)
    path = write_gguf(quantized, plan, tmp_path / "m.gguf", tokenizer=tokenizer, qparams=report.qparams)
    reader = GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    for name, spec in plan.quantized().items():
        t = stored[gguf_name(name)]
        assert t.tensor_type == Q[spec.name], name  # no layer moved
    planned = sum(int(stored[gguf_name(n)].n_bytes) for n in shapes)
    assert planned == plan.storage_bytes(shapes)
    assert gguf_data_bytes(quantized, plan) == path.stat().st_size - reader.data_offset
