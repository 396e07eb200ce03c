"""Hessian trace (Hutchinson) and top eigenvalue (power iteration) per linear: HAWQ-V2.

Idea: the loss increase from a weight change δ is, to second order, ½ δᵀ H δ. HAWQ-V2 replaces
the unit's diagonal Hessian block H_u by its mean eigenvalue Tr(H_u)/n_u, so

    damage(u, c) = ½ · max(Tr(H_u)/n_u, 0) · ‖w_u − q_c(w_u)‖²,

with n_u the unit's weight count and H the Hessian of the mean next-token loss over the
calibration windows. A negative trace estimate (a saddle, or noise at random init) gives
damage 0, since the quadratic model has nothing to say there; scores keep the signed value.

Hutchinson: for Rademacher v (±1 entries), E[vᵀAv] = Tr(A). One Hessian-vector product
Hv = ∂(gᵀv)/∂w (double backprop, `torch.autograd.grad(g, w, v)`) with v drawn for every unit
at once gives every unit's sample v_uᵀ(Hv)_u, whose mean is Tr(H_uu): the off-diagonal blocks
enter only through products v_u,i·v_j with zero mean (they add variance, not bias). Each
window gets `probes` fresh v's after one forward + backward with ``create_graph``; the m =
N·probes samples average to Tr of the mean-over-windows Hessian.

Top eigenvalue: power iteration v ← H_uu v / ‖H_uu v‖ on the unit's own block (v nonzero only
on u, one HVP per unit per iteration), on one batch of `eig_windows` windows whose graph is
built once. It converges to the eigenvalue of LARGEST MAGNITUDE, returned with its sign (the
Rayleigh quotient vᵀH_uu v at the last iterate); for a PSD block that is the largest one.

Cost, in passes over one window: Hutchinson N·(fwd + bwd with graph + probes·HVP), an HVP
costing about two backward passes; power iteration fwd + bwd on the batch plus
units·iterations HVPs. Memory: the retained graph is about twice a training step's, and v,
g and Hv each hold one value per linear weight.

Source: Dong et al. 2020 (HAWQ-V2), Yao et al. 2020 (PyHessian); Hutchinson 1990.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.fake import fake_quantize, storable
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import second_order_ready

log = logging.getLogger(__name__)


def rademacher(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """±1 entries of `shape` and `dtype` on the generator's device: one Hutchinson probe of one weight."""
    v = torch.randint(0, 2, shape, generator=generator, device=generator.device, dtype=dtype)
    return v * 2 - 1


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return rademacher(like.shape, like.dtype, generator).to(like.device)


def _gaussian(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return v.to(like.device)


def _hvp(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
         retain: bool) -> list[torch.Tensor]:
    """H v for the block of `params`, from gradients built with create_graph=True."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient constant in w has H rows of 0
    if not live:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad([grads[i] for i in live], params, [vs[i] for i in live],
                             retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


def check_probes(windows: torch.Tensor, probes: int) -> None:
    """ValueError unless `windows` is a non-empty [n, seqlen] batch and `probes` >= 1."""
    if windows.dim() != 2 or len(windows) == 0:
        raise ValueError(f"windows has shape {tuple(windows.shape)}; pass a LongTensor [n >= 1, seqlen]")
    if probes < 1:
        raise ValueError(f"probes={probes}; use at least 1 Rademacher vector per window")


def probe_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator the Rademacher probes are drawn from: the caller's, else a fresh one seeded 0 on `device`."""
    return generator if generator is not None else torch.Generator(device=device).manual_seed(0)


def hutchinson_trace(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
    probes: int = 1,
    progress: bool = True,
) -> dict[str, float]:
    """Tr(H_u) (the whole block trace, not per weight) of the mean-window loss Hessian, per linear.

    m = len(windows)·probes Rademacher samples, all units from one shared HVP per sample.
    `generator` (default: seeded 0 on `device`) draws every v on its own device, so pass one
    on `device` to avoid host-to-device copies; the global RNG is never used.
    """
    check_probes(windows, probes)
    gen = probe_generator(generator, device)
    names = list(linears)
    total = torch.zeros(len(names), dtype=torch.float64)
    with second_order_ready(model, names) as params:
        for window in tqdm(windows, desc="hessian trace", disable=not progress, leave=False):
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(probes):
                vs = [_rademacher(p, gen) for p in params]
                hv = _hvp(grads, params, vs, retain=k < probes - 1)
                total += torch.stack([(v.float() * h.float()).sum() for v, h in zip(vs, hv)]).double().cpu()
            del loss, grads
    total /= len(windows) * probes
    return {name: float(t) for name, t in zip(names, total)}


def _power_iteration(grad: torch.Tensor, param: torch.Tensor, gen: torch.Generator, iters: int, tol: float) -> float:
    v = _gaussian(param, gen)
    v /= v.norm()
    eig = math.nan
    for _ in range(iters):
        (hv,) = _hvp([grad], [param], [v.to(param.dtype)], retain=True)
        hv = hv.float()
        new = float((v * hv).sum())
        norm = hv.norm()
        if norm == 0:
            return 0.0
        v = hv / norm
        if abs(new - eig) <= tol * abs(new):
            return new
        eig = new
    return eig


def top_eigenvalues(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
    iters: int = 20,
    tol: float = 1e-3,
    progress: bool = True,
) -> dict[str, float]:
    """Largest-magnitude eigenvalue (signed) of each linear's diagonal Hessian block.

    The Hessian is that of the mean loss over `windows`, run as ONE batch (keep it small: its
    double-backward graph stays in memory for all units and iterations). Stops a unit when the
    Rayleigh quotient moves by at most `tol` relative, or after `iters` HVPs.
    """
    check_probes(windows, 1)
    if iters < 1:
        raise ValueError(f"iters={iters}; power iteration needs at least 1 step")
    gen = probe_generator(generator, device)
    names = list(linears)
    eig: dict[str, float] = {}
    with second_order_ready(model, names) as params:
        ids = windows.to(device)
        loss = model(input_ids=ids, labels=ids).loss  # equal lengths: batch mean = mean of window means
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for name, g, p in tqdm(list(zip(names, grads, params)), desc="hessian eig", disable=not progress, leave=False):
            eig[name] = _power_iteration(g, p, gen, iters, tol)
        del loss, grads
    return eig


def hessian_damage(weight: torch.Tensor, mean_trace: float, configs: Sequence[QuantSpec]) -> np.ndarray:
    """½ · max(Tr(H_u)/n_u, 0) · ‖w − q_c(w)‖² for every config c; weight is [out, in]."""
    w = weight.detach().float()
    curvature = max(mean_trace, 0.0)
    out = np.zeros(len(configs))
    for j, spec in enumerate(configs):
        if spec.keep:
            continue
        if not storable(spec, w.shape[1]):
            out[j] = np.nan  # a ggml type this row length cannot take
            continue
        out[j] = 0.5 * curvature * float((fake_quantize(w, spec) - w).square().sum())
    return out


def mean_traces(trace: Mapping[str, float], linears: Mapping[str, LinearInfo]) -> np.ndarray:
    """Tr(H_u)/n_u per linear, in `linears` order; warns when some are negative (their damage is 0)."""
    mean_trace = np.array([trace[n] / linears[n].numel for n in linears])
    negative = int((mean_trace < 0).sum())
    if negative:
        log.warning("%d of %d units have a negative Hessian trace estimate; their damage is set to 0 "
                    "(more windows or probes reduce the noise)", negative, len(mean_trace))
    return mean_trace


def hessian_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    generator: torch.Generator | None = None,
    probes: int = 1,
    top_eigen: bool = False,
    max_units: int | None = None,
    eig_windows: int = 4,
    eig_iters: int = 20,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] from Hutchinson traces; scores "hessian_trace" (Tr/n) and, with
    `top_eigen`, "hessian_top_eig".

    The top eigenvalue is computed for the `max_units` units of largest mean trace (None: all),
    on the first `eig_windows` windows as one batch; the other units score NaN.
    """
    gen = probe_generator(generator, device)
    trace = hutchinson_trace(model, windows, linears, device=device, generator=gen, probes=probes, progress=progress)
    names = list(linears)
    mean_trace = mean_traces(trace, linears)
    damage = np.zeros((len(names), len(configs)))
    for u, name in enumerate(tqdm(names, desc="damage table", disable=not progress, leave=False)):
        damage[u] = hessian_damage(get_weight(model.get_submodule(name)), float(mean_trace[u]), configs)
    scores = {"hessian_trace": mean_trace}
    if top_eigen:
        if max_units is not None and max_units < 0:
            raise ValueError(f"max_units={max_units}; pass None (all units) or a count >= 0")
        if eig_windows < 1:
            raise ValueError(f"eig_windows={eig_windows}; use at least 1 window for power iteration")
        order = np.argsort(-mean_trace, kind="stable")[: len(names) if max_units is None else max_units]
        chosen = {names[u]: linears[names[u]] for u in sorted(order)}
        eig = top_eigenvalues(model, windows[:eig_windows], chosen, device=device, generator=gen,
                              iters=eig_iters, progress=progress) if chosen else {}
        scores["hessian_top_eig"] = np.array([eig.get(n, math.nan) for n in names])
    return damage, scores
