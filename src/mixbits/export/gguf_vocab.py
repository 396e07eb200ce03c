"""The tokenizer of a GGUF file, written the way llama.cpp's converter writes it.

A Hugging Face fast tokenizer is saved to a temporary folder and its tokenizer.json read back: a
byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM) becomes `tokenizer.ggml.model = "gpt2"`
with its tokens by id and its merges; a SentencePiece-style BPE (byte fallback: Llama 2,
Mistral) becomes "llama" with scores, read by the `gguf` package's `LlamaHfVocab`. Special
tokens (bos/eos/unk/pad ids, add_bos, the chat template) come from `gguf.SpecialVocab`. Tokens
the tokenizer marks special are typed CONTROL, and the list is padded with `[PAD<i>]` entries up
to the model's vocabulary size, as llama.cpp expects one entry per embedding row.

`tokenizer.ggml.pre` (llama.cpp's pre-tokenizer name) cannot be derived from the tokenizer
without llama.cpp's table of known tokenizers; "default" is written unless the caller names one
(for SmolLM2 it is "smollm", for Llama 3 "llama-bpe", for Qwen 2 "qwen2").
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import TokenType

from mixbits.export.rules import ExportError


@dataclass(frozen=True)
class _BpeVocab:
    """A byte-level BPE vocabulary read from tokenizer.json (llama.cpp's "gpt2" model)."""

    tokenizer_model = "gpt2"
    tokens: tuple[str, ...]

    def all_tokens(self):
        for text in self.tokens:
            yield text, 0.0, TokenType.NORMAL


def _byte_level_bpe(folder: Path) -> _BpeVocab | None:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback", False):
        return None
    ids = dict(model["vocab"])
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or [] if t["content"] not in ids})
    by_id = {i: text for text, i in ids.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ExportError("the tokenizer's token ids are not contiguous from 0, so it cannot be written into GGUF")
    return _BpeVocab(tuple(by_id[i] for i in range(len(by_id))))


def _vocab(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        raise ExportError("the tokenizer has no tokenizer.json (not a fast tokenizer), so it cannot be written into "
                          "GGUF; pass a fast tokenizer, or tokenizer=None to write the model without one")
    bpe = _byte_level_bpe(folder)
    if bpe is not None:
        return bpe
    try:
        return gguf.vocab.LlamaHfVocab(folder)
    except (FileNotFoundError, KeyError, TypeError) as err:
        raise ExportError(
            "the tokenizer is neither byte-level BPE nor SentencePiece-style BPE, so it cannot be written into GGUF; "
            "pass tokenizer=None to write the model without one (llama.cpp then cannot run it)"
        ) from err


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str = "default") -> None:
    """Write `tokenizer` (a transformers fast tokenizer) into `writer`'s metadata."""
    with tempfile.TemporaryDirectory(prefix="mixbits-gguf-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        vocab = _vocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if len(tokens) > vocab_size:
            raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows; "
                              "pass the tokenizer the model was trained with")
        for token_id in getattr(tokenizer, "all_special_ids", []):
            if 0 <= token_id < len(types):
                types[token_id] = TokenType.CONTROL
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)
