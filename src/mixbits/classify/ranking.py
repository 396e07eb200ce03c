"""Which layers matter to the classifier: how far its predictions move when one layer alone is
quantized, on training sentences.

    KL(u)  = (1/N) Σ_i KL( p(·|x_i) ‖ p_u(·|x_i) )                      (nats; orders the layers)
    ΔCE(u) = (1/N) Σ_i CE(p_u(·|x_i), y_i) − (1/N) Σ_i CE(p(·|x_i), y_i)  (nats; reported)

with p the classifier's class distribution and p_u the same with unit u alone fake-quantized.
Held-out accuracy drops are the figures reported (`sensitivity.ablation.classifier_ablation`),
but on tens of test sentences they are multiples of 1/N and mostly tie at 0. The KL is
continuous and never negative, so it orders every layer by how much it disturbs the output; the
change of the loss is not used to order, because one layer at 4 bits moves it by as little as
1e-4 nats, either way, and a lucky decrease would mark a layer as robust. Both are measured on
training sentences, so the test sentences that score the strategies never choose them. Weights
are restored bit for bit after each unit (`quantized_in_place`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixbits.eval.classification import classifier_logits
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.units import quantized_in_place


def kl_and_ce(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean KL(softmax(reference) ‖ softmax(logits)), mean cross-entropy of `logits`), float64."""
    ref, out = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    return kl, float(F.nll_loss(out, labels))


@torch.no_grad()
def one_at_a_time(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  units: Mapping[str, Sequence[str]], spec: QuantSpec, *, device: torch.device,
                  batch_size: int = 32, progress: bool = False) -> dict[str, np.ndarray]:
    """{"kl": [U], "loss_increase": [U]} with each unit alone at `spec` (see the module docstring)."""
    reference = classifier_logits(model, inputs, device=device, batch_size=batch_size)
    _, base_ce = kl_and_ce(reference, reference, labels)
    kl, dce = np.zeros(len(units)), np.zeros(len(units))
    for u, members in enumerate(tqdm(list(units.values()), desc="rank layers", disable=not progress, leave=False)):
        with quantized_in_place(model, members, spec):
            logits = classifier_logits(model, inputs, device=device, batch_size=batch_size)
        kl[u], ce = kl_and_ce(reference, logits, labels)
        dce[u] = ce - base_ce
    return {"kl": kl, "loss_increase": dce}
