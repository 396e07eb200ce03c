"""A plain reference reader of GPTQ folders: the float model rebuilt from the files alone.

Written apart from the writer (`gptq.py`) and with none of its code, following the format as
GPTQModel and vLLM read it, so that a round trip through it checks the files, not the writer
against itself:

    W[o, i] = scales[g, o] * (q[i, o] - z[g, o]),   g = g_idx[i]

where q comes from `qweight` (int32 [in * b / 32, out]: column o is the little-endian bit
stream of the codes along the input dimension, so 3-bit codes span words), z from `qzeros`
(int32 [G, out * b / 32], the same stream per row) plus 1 in `checkpoint_format` "gptq" (v1
stores z - 1) and plus 0 in "gptq_v2". Each module's bits come from `quantization_config`:
the base spec, overridden by the first `dynamic` pattern that `re.match`es its name ("+:" or
no prefix), or skipped (kept in 16 bit) by a matching "-:" pattern. numpy does the unpacking,
one code position at a time, for clarity rather than speed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def unpack_columns(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes [count, C] from int32 words [W, C]: code i of a column sits at bits i*b .. i*b+b-1
    of the column's words read as one little-endian stream (so a code may span two words)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = np.zeros((count, packed.shape[1]), dtype=np.int64)
    for i in range(count):
        word, offset = divmod(i * bits, 32)
        value = words[word] >> offset
        if offset + bits > 32:
            value = value | (words[word + 1] << (32 - offset))
        out[i] = value & mask
    return out


def layer_config(qcfg: dict, name: str) -> dict | None:
    """GPTQModel's / vLLM's reading of `dynamic`: None when the module is skipped (fp16)."""
    base = {k: qcfg[k] for k in ("bits", "group_size", "sym")}
    for pattern, override in qcfg.get("dynamic", {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {**base, **override}
    return base


def rebuild_weight(tensors: dict, name: str, bits: int, zero_offset: int) -> torch.Tensor:
    """The float32 weight [out, in] of module `name` from its qweight, qzeros, scales, g_idx."""
    qweight, qzeros = tensors[f"{name}.qweight"].numpy(), tensors[f"{name}.qzeros"].numpy()
    scales, g_idx = tensors[f"{name}.scales"].float().numpy(), tensors[f"{name}.g_idx"].numpy()
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_columns(qweight, bits, in_features)                            # [in, out]
    zeros = unpack_columns(qzeros.T, bits, out_features).T + zero_offset     # [G, out]
    w = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx]
    return torch.from_numpy(w.T.copy())


@torch.no_grad()
def load_gptq_reference(folder: str | Path) -> tuple[nn.Module, dict]:
    """(float32 causal LM rebuilt from the GPTQ folder, its quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build a plain float model and fill it ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    offset = 1 if qcfg["checkpoint_format"] == "gptq" else 0
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(GPTQ_KEYS)}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        spec = layer_config(qcfg, name)
        if spec is None:
            raise ValueError(f"{folder}: {name} has GPTQ codes but a '-:' rule of `dynamic` skips it")
        state[f"{name}.weight"] = rebuild_weight(tensors, name, spec["bits"], offset)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model, qcfg
