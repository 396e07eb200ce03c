"""Token windows for calibration and evaluation, in the GPTQ / EfficientQAT convention.

Both kinds start the same way: the documents are joined with "\\n\\n" and tokenized once, as
`tokenizer(text, return_tensors="pt")` does it (so a tokenizer that adds a BOS token adds exactly
one, at the very start). Then

* evaluation takes non-overlapping windows of `seqlen` tokens from the start, dropping the tail
  that does not fill a window: window i is tokens [i·seqlen, (i+1)·seqlen);
* calibration draws `n` windows at uniformly random start offsets in [0, N − seqlen] from a
  `torch.Generator` seeded with `seed`; windows may overlap, the draw is reproducible.

Results are int64 tensors [n, seqlen] on the CPU; the caller moves them and caches them if it
wants to (tokenizing a few million characters takes seconds, so it is worth keeping).
"""

from __future__ import annotations

import hashlib

import torch

from mixbits.errors import UserError


def tokenize_joined(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents joined with "\\n\\n" and tokenized once: int64 tensor [N]."""
    if isinstance(docs, str):
        raise TypeError("docs must be a list of documents, not one string; wrap it as [text]")
    text = "\n\n".join(docs)
    # verbose=False: the text is far longer than the model's context on purpose; no warning.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


MIN_SEQLEN = 16  # the shortest window mixbits accepts (--seqlen)


def _check_length(n_tokens: int, seqlen: int, what: str) -> None:
    if seqlen < 1:
        raise UserError(f"seqlen {seqlen} must be a positive number of tokens")
    if n_tokens < max(seqlen, MIN_SEQLEN) and n_tokens < MIN_SEQLEN:
        raise UserError(
            f"the {what} text has only {n_tokens} tokens, fewer than the shortest window mixbits accepts "
            f"({MIN_SEQLEN} tokens); use a longer text"
        )
    if n_tokens < seqlen:
        raise UserError(
            f"the {what} text has only {n_tokens} tokens, shorter than one window of {seqlen}; "
            f"use a smaller --seqlen (at most {n_tokens}) or a longer text"
        )


def eval_windows(tokenizer, docs: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of the joined text; the tail is dropped.

    `max_windows` keeps only the first windows (None = all of them).
    """
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows {max_windows} must be >= 1, or None for every window")
    ids = tokenize_joined(tokenizer, docs)
    _check_length(ids.numel(), seqlen, "evaluation")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def calibration_windows(tokenizer, docs: list[str], seqlen: int, n: int, seed: int) -> torch.Tensor:
    """`n` windows [n, seqlen] at random offsets of the joined text, reproducible from `seed`."""
    if n < 1:
        raise UserError(f"n {n} calibration windows must be at least 1")
    ids = tokenize_joined(tokenizer, docs)
    _check_length(ids.numel(), seqlen, "calibration")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    offsets = starts[:, None] + torch.arange(seqlen)[None, :]
    return ids[offsets]


def text_fingerprint(tokens: torch.Tensor) -> str:
    """sha256 (hex) of a token tensor's shape and int64 values: a cache key for windows."""
    t = tokens.detach().to(device="cpu", dtype=torch.long).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}:".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()
