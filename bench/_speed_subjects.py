"""What bench/speed.py profiles: a model, its calibration and held-out windows, and the plan.

Real models come through `mixbits.model.load` and cut their windows from the embedded text.
Tiny random Llamas (for `--quick` and the width scaling) are built in code; their windows are
random token ids, which cost exactly what text of the same length costs. A random model that must
be *loaded* (the load stage of `--quick`) is saved first, with a byte-level tokenizer of 256
byte tokens that needs no training and that every export format, GGUF included, can store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, candidate_configs
from mixbits.data.text import load_text
from mixbits.data.windows import calibration_windows, eval_windows
from mixbits.export.formats import FORMATS, expressible, fused_groups
from mixbits.model.arch import LinearInfo, find_linears
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec

RANDOM_VOCAB = 4096
EXPORT_SPECS = (QuantSpec(4, 128), QuantSpec(4, 64), QuantSpec(4, 32))


@dataclass
class Subject:
    """One model and the tokens every stage of one profile uses."""

    name: str
    model: nn.Module
    tokenizer: object
    calib: Tensor  # [n, seqlen] calibration (and Block-AP training) windows
    held: Tensor  # [m, seqlen] held-out windows: evaluation, and the first ones Block-AP validation
    device: torch.device
    linears: dict[str, LinearInfo]
    configs: tuple[QuantSpec, ...]  # sensitivity candidates
    plan: Plan  # the uniform plan every quantizer and export format runs

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def with_calib(self, n: int) -> "Subject":
        """The same model on the first `n` calibration windows."""
        return Subject(self.name, self.model, self.tokenizer, self.calib[:n], self.held, self.device, self.linears,
                       self.configs, self.plan)

    def describe(self) -> dict:
        return {"name": self.name, "params": self.params, "linears": len(self.linears),
                "calibration": {"windows": len(self.calib), "seqlen": self.calib.shape[1],
                                "tokens": self.calib.numel()},
                "held_out": {"windows": len(self.held), "seqlen": self.held.shape[1]},
                "plan": self.plan.meta.get("strategy"), "configs": [c.label for c in self.configs]}


def export_plan(model: nn.Module, linears: dict[str, LinearInfo]) -> Plan:
    """The first uniform 4-bit plan (group 128, 64, then 32) that every export format can store:
    GPTQ and compressed-tensors need whole groups per row (smollm2's 576 inputs take g64)."""
    shapes = {n: (i.out_features, i.in_features) for n, i in linears.items()}
    fused = fused_groups(model)
    for spec in EXPORT_SPECS:
        plan = Plan.uniform(shapes, spec)
        if all(not expressible(fmt, plan, shapes, fused) for fmt in FORMATS):
            return plan
    raise ValueError(f"no uniform plan among {[s.label for s in EXPORT_SPECS]} is storable by every format")


def make_subject(name: str, model: nn.Module, tokenizer, calib: Tensor, held: Tensor,
                 device: torch.device) -> Subject:
    model = model.to(device).eval()
    linears = find_linears(model)
    return Subject(name, model, tokenizer, calib, held, device, linears,
                   candidate_configs(DEFAULT_BITS, DEFAULT_GROUPS), export_plan(model, linears))


def text_windows(tokenizer, dataset: str, seqlen: int, calib: int, held: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Calibration windows (random offsets of the calibration split) and the first held-out ones."""
    return (calibration_windows(tokenizer, load_text(dataset, "calibration"), seqlen, calib, seed),
            eval_windows(tokenizer, load_text(dataset, "test"), seqlen, held))


def random_windows(vocab: int, seqlen: int, calib: int, held: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (calib + held, seqlen), generator=gen)
    return ids[:calib].clone(), ids[calib:].clone()


def random_llama(hidden: int, layers: int, seqlen: int, vocab: int = RANDOM_VOCAB, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama of width `hidden`: head dim 64 (32 below 128), MLP 8/3 x hidden rounded to 64,
    as many key-value heads as query heads, untied head (as in larger Llamas)."""
    head_dim = 64 if hidden >= 128 else 32
    mlp = max(64, round(hidden * 8 / 3 / 64) * 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=hidden // head_dim, num_key_value_heads=hidden // head_dim,
                      max_position_embeddings=max(seqlen, 128), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte tokens and no merges, plus <s> and </s>."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def save_random_llama(folder: Path, hidden: int, layers: int, seqlen: int) -> Path:
    """A random Llama and the byte tokenizer as a plain HF folder, for `load_model`."""
    random_llama(hidden, layers, seqlen).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
