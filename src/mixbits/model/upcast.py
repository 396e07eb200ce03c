"""Embeddings and head held in 16 bits and computed in the compute dtype: the same numbers at half the memory.

Idea: outside the blocks a causal LM holds its largest tensors, the token embedding and the head
([vocab, hidden] each; 2 · 49152 · 2048 values for a 2B Llama, more than ten blocks' worth of
memory in float32). A stage computing in float32 on a bfloat16 checkpoint need not hold them in
float32: casting a 16-bit float to float32 is exact, so

    embedding   rows = E[ids]                     gathered in 16 bits, then cast:   E[ids].float()
    head        logits[..., a:b] = x · W[a:b]ᵀ    one row chunk of W cast at a time: W[a:b].float()

give the values the float32 module gives, while only one chunk of W (≤ `CHUNK_BYTES`) exists in
float32 at a time. The backward pass of the head (the Fisher pass needs ∂loss/∂x) recasts the chunks
instead of keeping them: ∂x = Σ_chunks ∂logits[..., a:b] · W[a:b]. The head's weight takes no
gradient here (it is not a quantized block linear).

Rounding through the storage dtype (what the native export stores, float16 by default) is the same
trick: holding the tensor in float16 is holding it rounded, so a quantized variant's outside tensors
cost one 16-bit copy instead of a float32 original plus a float32 rounded copy.

Only the plain modules are taken over (`type(m) is nn.Embedding` / `nn.Linear`): a subclass that
scales its output (Gemma's scaled embedding) would compute that scale in 16 bits, so it stays in the
compute dtype (exact, at full size); `held_names` says which tensors qualify.

Trade-off: the head runs as several matrix products instead of one (the same flops; logits are
written chunk by chunk) and its float32 results match the single product to rounding of the sums'
blocking (relative ~1e-7), not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CHUNK_BYTES", "head_chunk_rows", "held_names", "upcasting"]

CHUNK_BYTES = 64 * 2**20  # one chunk of the head's weight in the compute dtype


def held_names(model: nn.Module) -> list[str]:
    """Parameter names (as `named_parameters` gives them, tied ones once) of the input embedding's and the
    head's weights, where those modules are the plain `nn.Embedding` / `nn.Linear` this file can take over."""
    wanted = {}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embed) is nn.Embedding and embed.max_norm is None:
        wanted[id(embed.weight)] = True
    if type(head) is nn.Linear:
        wanted[id(head.weight)] = True
    return [name for name, param in model.named_parameters() if id(param) in wanted]


def head_chunk_rows(in_features: int, dtype: torch.dtype) -> int:
    """Rows of the head's weight cast per chunk (at most `CHUNK_BYTES` in `dtype`)."""
    return max(1, CHUNK_BYTES // max(1, in_features * dtype.itemsize))


class _ChunkedHead(torch.autograd.Function):
    """y = x · Wᵀ + b with W held in 16 bits and cast to x's dtype one row chunk at a time."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for a in range(0, weight.shape[0], rows):
            out[..., a : a + rows] = F.linear(x, weight[a : a + rows].to(x.dtype),
                                              None if bias is None else bias[a : a + rows].to(x.dtype))
        ctx.save_for_backward(weight)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(*grad.shape[:-1], weight.shape[1], dtype=grad.dtype, device=grad.device)
            for a in range(0, weight.shape[0], ctx.rows):
                grad_x += grad[..., a : a + ctx.rows] @ weight[a : a + ctx.rows].to(grad.dtype)
        return grad_x, None, None, None


@contextlib.contextmanager
def upcasting(model: nn.Module, compute_dtype: torch.dtype) -> Iterator[None]:
    """For the duration, the input embedding and the head compute in `compute_dtype` whatever dtype
    their weights are held in (module docstring); modules whose weights already are in `compute_dtype`
    are left alone. The modules' own `forward` is restored on exit."""
    patched: list[nn.Module] = []
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    try:
        if type(embed) is nn.Embedding and embed.weight.dtype != compute_dtype:
            original = embed.forward
            embed.forward = lambda ids, _f=original: _f(ids).to(compute_dtype)
            patched.append(embed)
        if type(head) is nn.Linear and head.weight.dtype != compute_dtype:
            if head.weight.requires_grad:
                raise ValueError("the head's weight requires grad; a head held in 16 bits gives no weight "
                                 "gradient (hold it in the compute dtype instead)")
            rows = head_chunk_rows(head.in_features, compute_dtype)
            head.forward = lambda x, _m=head: _ChunkedHead.apply(x.to(compute_dtype), _m.weight, _m.bias, rows)
            patched.append(head)
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward is back
