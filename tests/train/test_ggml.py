"""Block-AP on ggml grids (issue 16): a plan of GGUF K-quants, legacy types and IQ4_NL beside affine specs
trains, never ends worse than its start, stores exactly what it trained (native folder and GGUF file,
read back by llama.cpp's decoder), resumes bit for bit, and streamed equals whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixbits.config import TrainConfig
from mixbits.export.gguf import write_gguf
from mixbits.export.native import load_native, save_native
from mixbits.export.native_shards import block_file
from mixbits.model.arch import find_linears, get_weight
from mixbits.model.quantize import quantize_model
from mixbits.model.quantize_streamed import dequantized_block
from mixbits.plan import Plan
from mixbits.quant import kquant
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.train.run import train_model
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import L, gguf_name, read_tensors, wide_llama
from tests.train.test_run import windows
from tests.train.test_streamed import sha256, streamed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: exact sums

CPU = torch.device("cpu")
# learning rates at which every block beats its start on this random model (EfficientQAT's 1e-4 quant lr
# moves its sub-block scales too far here); two epochs of four batches
CFG = TrainConfig(epochs=2, batch_size=2, quant_lr=1e-5, weight_lr=2e-5)


def plan() -> Plan:
    """Every kind of grid: K-quants with and without mins, IQ4_NL and IQ4_XS, the legacy types with a scale or a
    scale and an offset per 32, an affine spec, and a kept layer."""
    labels = {"0.self_attn.q_proj": "Q4_K", "0.self_attn.k_proj": "Q6_K", "0.self_attn.v_proj": "Q3_K",
              "0.self_attn.o_proj": "Q2_K", "0.mlp.gate_proj": "IQ4_NL", "0.mlp.up_proj": "Q4_0",
              "0.mlp.down_proj": "Q5_K", "1.self_attn.q_proj": "w3g64", "1.self_attn.k_proj": "Q4_1",
              "1.self_attn.v_proj": "Q5_1", "1.self_attn.o_proj": "Q5_0", "1.mlp.gate_proj": "IQ4_XS",
              "1.mlp.up_proj": "Q3_K"}  # 1.mlp.down_proj: kept
    return Plan({L + n: QuantSpec.parse(v) if v.startswith("w") else GGMLSpec.parse(v) for n, v in labels.items()})


def ggml_only() -> Plan:
    """The plan's ggml layers (GGUF stores no affine grid; the rest stays in F16 there)."""
    return Plan({n: s for n, s in plan().specs.items() if isinstance(s, GGMLSpec)})


def ggml_qparams(report) -> dict:
    return {n: qp for n, qp in report.qparams.items() if isinstance(qp, GGMLParams)}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text())


@pytest.fixture(scope="module")
def trained(tokenizer):
    model = wide_llama(len(tokenizer))
    calib, val = windows(8, 1, seqlen=32) % len(tokenizer), windows(4, 2, seqlen=32) % len(tokenizer)
    model_q, report = train_model(model, plan(), calib, val, CFG, device=CPU, progress=False)
    return model, model_q, report, calib, val


def test_every_block_trains_and_beats_its_start(trained):
    _, _, report, _, _ = trained
    assert len(report.blocks) == 2
    for b in report.blocks:
        assert b.best_epoch > 0 and b.loss_end < b.loss_start, b.to_dict()


def test_the_trained_weights_are_their_grids_round_to_nearest_and_training_moved_codes(trained):
    model, model_q, report, _, _ = trained
    start, init = quantize_model(model, plan(), device=CPU, progress=False)
    moved_codes = moved_scales = 0
    for name, spec in plan().quantized().items():
        if not isinstance(spec, GGMLSpec):
            continue
        w, qp = get_weight(model_q.get_submodule(name)), report.qparams[name]
        assert isinstance(qp, GGMLParams) and qp.spec == spec
        codes = kquant.quantize(w, qp)
        assert torch.equal(kquant.dequantize(codes, qp), w), name  # the stored grid writes this weight
        lo, hi = spec.sc_range
        assert int(qp.sc.min()) >= lo and int(qp.sc.max()) <= hi
        assert torch.equal(qp.d, qp.d.half().float()) and torch.equal(qp.dmin, qp.dmin.half().float())
        moved_codes += not torch.equal(codes, kquant.quantize(get_weight(start.get_submodule(name)), init.qparams[name]))
        moved_scales += not (torch.equal(qp.sc, init.qparams[name].sc) and torch.equal(qp.d, init.qparams[name].d))
    assert moved_codes > 0 and moved_scales > 0


def test_native_folder_and_gguf_file_hold_exactly_the_trained_model(trained, tokenizer, tmp_path):
    _, model_q, report, _, _ = trained
    save_native(model_q, plan(), tmp_path / "m", qparams=report.qparams)
    ids = windows(1, 9, seqlen=24) % len(tokenizer)
    with torch.no_grad():
        assert torch.equal(load_native(tmp_path / "m")(input_ids=ids).logits, model_q(input_ids=ids).logits)
    path = tmp_path / "model.gguf"
    write_gguf(model_q, ggml_only(), path, tokenizer=tokenizer, qparams=ggml_qparams(report))
    tensors = read_tensors(path)
    for name, spec in plan().quantized().items():
        if isinstance(spec, GGMLSpec):
            _, _, weight = tensors[gguf_name(name)]
            assert torch.equal(weight, get_weight(model_q.get_submodule(name))), name


def test_llama_cpp_runs_the_trained_file_with_the_trained_logits(trained, tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, model_q, report, _, _ = trained
    path = tmp_path / "model.gguf"
    write_gguf(model_q, ggml_only(), path, tokenizer=tokenizer, qparams=ggml_qparams(report))
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = tokenizer("The city of music and film was the first new school.").input_ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model_q(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # llama.cpp rounds activations to 8 bits


def test_a_killed_run_resumes_bit_for_bit(trained, tmp_path):
    model, model_q, report, calib, val = trained

    def crash(index):
        if index == 0:
            raise KeyboardInterrupt("killed after block 0")

    with pytest.raises(KeyboardInterrupt):
        train_model(model, plan(), calib, val, CFG, device=CPU, checkpoint_dir=tmp_path, progress=False,
                    on_block_done=crash)
    resumed, again = train_model(model, plan(), calib, val, CFG, device=CPU, checkpoint_dir=tmp_path, resume=True,
                                 progress=False)
    assert again.resumed_blocks == (0,)
    for a, b in zip(resumed.state_dict().values(), model_q.state_dict().values()):
        assert torch.equal(a, b)
    for name, qp in report.qparams.items():
        if isinstance(qp, GGMLParams):
            got = again.qparams[name]
            assert all(torch.equal(x, y) for x, y in zip((got.d, got.dmin, got.sc, got.mn), (qp.d, qp.dmin, qp.sc, qp.mn)))


def test_streamed_from_a_checkpoint_writes_the_same_shards(trained, tmp_path):
    model, model_q, report, calib, val = trained
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="1MB")
    _, writer, got = streamed(folder, plan(), calib, val, CFG, tmp_path / "model")
    assert [s.loss_end for s in got.blocks] == [s.loss_end for s in report.blocks]
    specs = plan().quantized()
    for i in range(2):
        block = {n: s for n, s in specs.items() if n.startswith(f"{L}{i}.")}
        for name, (weight, _) in dequantized_block(writer.read_block(i), block, find_linears(model)).items():
            assert torch.equal(weight, get_weight(model_q.get_submodule(name))), name
    save_native(model_q, plan(), tmp_path / "whole", qparams=report.qparams)
    for i in range(2):
        assert sha256(tmp_path / "model")[block_file(i)] == sha256(tmp_path / "whole")[block_file(i)], i
