"""Perplexity, KL divergence and top-1 agreement on the same token windows.

Perplexity follows the GPTQ / EfficientQAT convention: the test documents are joined with
"\\n\\n", tokenized once, cut into non-overlapping windows of `seqlen` tokens (the tail is
dropped), and each window is scored on its own with no context carried over:

    ppl = exp( Σ_windows Σ_{t=1}^{S-1} −log p(x_t | x_<t) / (n · (S−1)) )

Divergence to the original is measured on the very same windows and positions:

    KL = mean_t Σ_v p_ref(v|x_<t) · (log p_ref(v|x_<t) − log p_q(v|x_<t))      (nats/token)
    top-1 = mean_t [argmax p_ref = argmax p_q]

All models are run window by window, so the reference's distribution is computed once per
window and never stored whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

CONVENTION = (
    "GPTQ/EfficientQAT: documents joined with '\\n\\n', tokenized once, non-overlapping windows of "
    "{seqlen} tokens, tail dropped, no carried context; KL(original || model) in nats/token"
)


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean next-token negative log-likelihood, nats
    kl: float | None  # mean KL(reference || model), nats per token
    top1: float | None  # fraction of positions where the argmax token agrees with the reference
    tokens: int  # predicted tokens scored
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        """JSON-ready: an infinite ppl/nll/kl (an extreme quantization whose model gives a target token
        probability 0) is written as null, with `"infinite": [field names]` saying which."""
        data = asdict(self)
        infinite = [k for k in ("ppl", "nll", "kl") if data[k] is not None and math.isinf(data[k])]
        for k in infinite:
            data[k] = None
        if infinite:
            data["infinite"] = infinite
        return data


@torch.no_grad()
def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1, :]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def evaluate_models(
    models: Mapping[str, nn.Module],
    windows: torch.Tensor,
    *,
    device: torch.device,
    reference: str | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score every model on `windows` [n, seqlen]; KL and top-1 are against `models[reference]`."""
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    n, seqlen = windows.shape
    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    agree = {k: 0 for k in models}
    count = 0
    for window in tqdm(windows, desc="evaluate", disable=not progress, leave=False):
        ids = window.unsqueeze(0).to(device)
        target = ids[:, 1:]
        ref = _log_probs(models[reference], ids) if reference is not None else None
        for name, model in models.items():
            logp = ref if name == reference else _log_probs(model, ids)
            nll[name] += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
            if ref is not None:
                kl[name] += float((ref.exp() * (ref - logp)).sum())
                agree[name] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            _check_finite(name, len(models), nll[name], kl[name], window_index=count // target.numel())
        count += target.numel()
    results = {}
    for name in models:
        mean = nll[name] / count
        results[name] = EvalResult(
            ppl=math.exp(mean) if mean < 709.0 else math.inf,  # exp overflows a double beyond ~709.78
            nll=mean,
            kl=kl[name] / count if reference is not None else None,
            top1=agree[name] / count if reference is not None else None,
            tokens=count,
            windows=n,
            seqlen=seqlen,
        )
    return results


def _check_finite(name: str, n_models: int, nll: float, kl: float, window_index: int) -> None:
    """NaN NLL or KL means the model's logits hold NaN: stop, naming the variant and the window.

    +inf is allowed (a token given probability 0 by an extreme quantization): the result says so."""
    if math.isnan(nll) or math.isnan(kl):
        what = "NLL" if math.isnan(nll) else "KL to the reference"
        raise NonFiniteResult(
            f"evaluation of {name!r} (one of {n_models} models) gave NaN {what} at window {window_index}: its "
            "logits hold NaN, so its perplexity, KL and top-1 agreement would be meaningless. The quantized "
            "weights of this variant (or the original model) are broken"
        )


class NonFiniteResult(RuntimeError):
    """A model produced NaN during evaluation; the message names the model and the window."""
