"""Bad inputs: one `error:` line naming the file, flag or layer and the fix, exit 2, and no compute
started when the input alone shows the problem; every other exception keeps its traceback."""

from __future__ import annotations

import errno
import json
import os
import pickle

import pytest
import torch

from tests.reliability.conftest import invoke, one_line_error


def run_args(model, text, out, *extra):
    return ("run", "--no-verbose", "--model", str(model), "--dataset", str(text), "--output-dir", str(out),
            "--seqlen", "32", "--calib-windows", "2", "--eval-windows", "2", *extra)


# ---------------------------------------------------------------- one error type


def test_a_plain_value_error_from_a_bug_keeps_its_traceback(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import mixbits.pipeline

    def bug(cfg):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(mixbits.pipeline, "run", bug)
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out"))
    assert r.exit_code == 1 and isinstance(r.exception, ValueError), (r.exit_code, r.output)
    assert "error:" not in r.output  # not dressed up as a user error


def test_user_error_is_the_one_type_and_a_value_error():
    from mixbits.data.errors import MixbitsDataError
    from mixbits.errors import UserError
    from mixbits.export.rules import ExportError
    from mixbits.plan import PlanError

    for kind in (MixbitsDataError, ExportError, PlanError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError)
    assert issubclass(MixbitsDataError, RuntimeError)  # callers written for the old base still catch it


# ---------------------------------------------------------------- flags checked before the model loads


def test_bad_keep_regex_is_refused_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path, no_model_load):
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--keep", "layers.(0"))
    one_line_error(r, "--keep", "'layers.(0'", "regular expression")


def test_bad_pin_regex_is_refused_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path, no_model_load):
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--pin", "mlp[=4"))
    one_line_error(r, "--pin", "'mlp['", "regular expression")


@pytest.mark.parametrize("device", ["tpu", "xla", "cuda:x"])
def test_unknown_device_is_refused_before_the_model_loads(device, tiny_model_dir, tiny_text_file, tmp_path,
                                                          no_model_load):
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--device", device))
    one_line_error(r, "--device", device, "cpu, cuda")


def test_a_cuda_index_beyond_the_devices_is_refused(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                     no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--device", "cuda:7"))
    one_line_error(r, "--device cuda:7", "1 CUDA device", "cuda:0")


def test_seqlen_beyond_the_model_context_is_refused_before_the_weights_load(tiny_model_dir, tiny_text_file,
                                                                            tmp_path, no_model_load):
    r = invoke(*run_args(tiny_model_dir, tiny_text_file, tmp_path / "out", "--seqlen", "4096"))
    one_line_error(r, "--seqlen 4096", "max_position_embeddings = 256", "--seqlen 256")


def test_negative_fixed_bytes_is_refused_before_the_table_is_read(tmp_path, monkeypatch):
    import mixbits.sensitivity.table as table

    def refuse(*args, **kwargs):
        raise AssertionError("the table was read although the flag alone is wrong")

    monkeypatch.setattr(table.DamageTable, "load", classmethod(refuse))
    r = invoke("allocate", str(tmp_path / "sensitivity.json"), "--target-size-mb", "1", "--fixed-bytes", "-5")
    one_line_error(r, "--fixed-bytes -5", "negative")


def test_a_pin_that_matches_no_layer_names_the_pattern_and_real_layers():
    import numpy as np

    from mixbits.allocate.optimal import Constraints, allowed_options
    from mixbits.quant.spec import KEEP, QuantSpec
    from mixbits.sensitivity.table import DamageTable

    units = ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj")
    table = DamageTable(units, ((64, 128), (128, 64)), (QuantSpec(4), KEEP), np.ones((2, 2)), "fisher")
    with pytest.raises(ValueError, match=r"down_prj.*matches no layer.*model\.layers\.0\.mlp\.down_proj"):
        allowed_options(table, Constraints(pins=(("down_prj", QuantSpec(4)),)))


# ---------------------------------------------------------------- text files


def test_an_undecodable_text_file_is_named_before_the_model_loads(tiny_model_dir, tmp_path, no_model_load):
    text = tmp_path / "latin1.txt"
    text.write_bytes("Caf\xe9 cr\xe8me, na\xefve.\n\n".encode("latin-1") * 50)
    r = invoke(*run_args(tiny_model_dir, text, tmp_path / "out"))
    one_line_error(r, "latin1.txt", "not UTF-8")


def test_a_suggested_seqlen_is_never_below_the_minimum(tiny_model_dir):
    from transformers import AutoTokenizer

    from mixbits.data.windows import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError) as err:
        calibration_windows(tokenizer, ["the city"], 64, 1, 0)
    message = str(err.value)
    suggested = [int(w) for w in message.replace(")", " ").split() if w.isdigit()]
    assert "at most" not in message or min(suggested) >= 16, message
    assert "16" in message and "longer text" in message, message


# ---------------------------------------------------------------- model folders


def test_a_folder_without_tokenizer_files_says_so(model_copy, tiny_text_file, tmp_path, no_model_load):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    r = invoke(*run_args(model_copy, tiny_text_file, tmp_path / "out"))
    one_line_error(r, str(model_copy), "no tokenizer files", "tokenizer.save_pretrained")
    assert "install" not in r.output  # the old answer: "install sentencepiece"


def test_a_truncated_safetensors_file_of_a_model_is_named(model_copy, tiny_text_file, tmp_path, no_model_load):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    r = invoke(*run_args(model_copy, tiny_text_file, tmp_path / "out"))
    one_line_error(r, "model.safetensors", "truncated")


def test_a_corrupt_safetensors_header_is_named(model_copy, tiny_text_file, tmp_path, no_model_load):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header, garbled
    weights.write_bytes(bytes(data))
    r = invoke(*run_args(model_copy, tiny_text_file, tmp_path / "out"))
    one_line_error(r, "model.safetensors", "corrupt")


class _Payload:
    """Unpickling this would call print: a stand-in for any code a hostile pickle runs."""

    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_a_hostile_pickle_checkpoint_gets_our_message_and_never_runs(model_copy, capsys):
    from mixbits.model.load import load_model

    (model_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Payload()}, model_copy / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load_model(str(model_copy))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors" in message, message
    assert "weights_only=False" not in message and "weights_only" not in message
    assert "PICKLE CODE RAN" not in capsys.readouterr().out


def test_a_truncated_checkpoint_block_is_named(tmp_path):
    from mixbits.train.checkpoint import BlockCheckpoint

    ckpt = BlockCheckpoint(tmp_path / "ckpt", {"run": 1}, resume=False)
    ckpt.save(0, {"w": torch.ones(64, 64)}, {"loss": 0.5})
    block = next(p for p in (tmp_path / "ckpt").rglob("*.safetensors"))
    block.write_bytes(block.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{block.name}.*(truncated|corrupt)"):
        ckpt.load(0)


def test_a_truncated_run_folder_model_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from mixbits.export.native import LEGACY_FORMAT, WEIGHTS, load_native

    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (folder / "mixbits.json").write_text(json.dumps({"format": LEGACY_FORMAT, "plan": {"layers": {}}}))
    save_file({"x": torch.ones(256, 256)}, str(folder / WEIGHTS))
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*truncated"):
        load_native(folder)


# ---------------------------------------------------------------- writes


def test_a_full_disk_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    import mixbits.io
    from mixbits.plan import Plan
    from mixbits.quant.spec import QuantSpec

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mixbits.io.os, "fsync", full)
    target = tmp_path / "out" / "plan.json"
    with pytest.raises(ValueError, match=r"plan\.json.*no space left"):
        Plan({"a.q": QuantSpec(4)}).save(target)
    assert not target.exists() and os.listdir(tmp_path / "out") == []


def test_pickle_payload_is_a_real_payload():
    """Guard for the pickle test: the payload does run code when unpickled without weights_only."""
    assert pickle.loads(pickle.dumps(_Payload())) is None
