"""`--quick`: a tiny random Llama and two tiny texts, so the whole benchmark runs in seconds.

The model (hidden 256, 2 blocks: every row a multiple of 256, so GGUF's K-quants can hold it) comes with
a byte-level tokenizer (the 256 byte tokens, two merges, plus <s> and </s>) that needs no
training and that the GGUF writer and llama.cpp both read. The two texts are pseudo-English
documents separated by blank lines, read as `.txt` datasets (split by document like `wiki`).
Nothing here measures quality; it only exercises every arm.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a of and to in is was for on that with as by at from his her it an were are which this be has had "
         "or not their first new two after one also other all its years city state time river music film").split()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e")]  # llama.cpp refuses a BPE vocabulary without merges
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write_text(path: Path, seed: int, n_docs: int = 40) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(8)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return path


def quick_data(folder: Path) -> tuple[str, str, str]:
    """(model folder, calibration/first text, second text), written once under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
    return str(model_dir), str(write_text(folder / "first.txt", 0)), str(write_text(folder / "second.txt", 1))
