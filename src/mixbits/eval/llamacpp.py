"""llama.cpp (through `llama-cpp-python`, optional: `pip install mixbits[llamacpp]`) called like
a Hugging Face causal LM, so that `eval.perplexity.evaluate_models` scores a GGUF file in
llama.cpp with exactly the code, the windows and the token ids it scores mixbits' models with.

`LlamaCppLM(path, n_ctx)(input_ids)` evaluates each row of token ids from position 0 with an
emptied KV cache (no context carried from the previous window, as mixbits' convention asks)
and returns an object whose `.logits` is float32 [batch, seq, vocab]: the logits llama.cpp
computed for every position (`logits_all=True`). No token is added or re-tokenized: a BOS is
there only where mixbits' own windows have one. llama.cpp rounds activations to 8 bits in its
quantized matrix products, so its logits differ slightly from a float evaluation of the same
weights; that difference is what its perplexity beside mixbits' measures.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


class LlamaCppLM:
    """A GGUF model run by llama.cpp; `self(input_ids).logits` as a transformers model gives it."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None):
        try:
            import llama_cpp
        except ImportError as err:
            raise ImportError("llama.cpp runs through llama-cpp-python: `pip install mixbits[llamacpp]` "
                              "(it builds llama.cpp from source: cmake, a C++ compiler, minutes)") from err
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
            n_threads=n_threads or torch.get_num_threads() or os.cpu_count(),
        )

    def _row_logits(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.n_ctx:
            raise ValueError(f"a window of {len(ids)} tokens does not fit n_ctx={self.n_ctx}; "
                             f"build LlamaCppLM with n_ctx >= the window length")
        self.llm.reset()  # position 0 and an emptied KV cache: no carried context
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        rows = [self._row_logits(row) for row in input_ids.cpu().tolist()]
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self) -> None:
        self.llm.close()
