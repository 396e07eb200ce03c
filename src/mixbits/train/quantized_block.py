"""A transformer block whose planned linears compute with trainable fake-quantized weights.

For each planned linear l with spec (bits, group size) the trainable tensors are the latent
weight W [out, in], the per-group step sizes s [out, G] and zero-points z [out, G] (z is fixed
at 2**(bits-1) for symmetric specs: it is not stored, so it is not learned). The block runs with

    W_hat = (clamp(round(W / s) + round(z), 0, maxq) - round(z)) * s       (quant.affine)

where round passes gradients straight through (STE), so W, s and z all learn; s is clamped to
fp16's normal range with a straight-through clamp (as EfficientQAT's clamp_ste), so a step
that pushes it out of range does not cut its gradient. No module is swapped or patched: the
block is called through `torch.func.functional_call` with W_hat in place of each weight, so
every architecture in `model.arch` works unchanged (GPT-2's Conv1D gets W_hat transposed).

A linear planned as a ggml type (`GGMLSpec`: GGUF K-quants, legacy types, IQ4_NL, IQ4_XS) trains its latent
weight and one scale and one min per sub-block on its type's grid instead (`quant.ggml_ste`: the
sub-block scale codes move under the start grid's fixed fp16 super-block scales); `self.scale` and
`self.zero` then hold those scales and mins, and its finalized qparams are `GGMLParams`.

`finalize` turns the trainable state into what will be stored: scales rounded to fp16, zeros
to integers in [0, maxq], codes q = quantize(W, (s, z)) and the written weight dequantize(q).
The packed export re-derives exactly those codes from the written weight, so validation, the
in-memory model and the saved file all hold one and the same quantized block. A state with any
non-finite value finalizes to None and is never accepted.

Start (`start_of`): the init's written weight Q and its QParams. The latent W starts at the
original weight when round-to-nearest of it under those QParams reproduces Q (rtn, clip), so
the latent weights keep their position inside the rounding bins and codes can flip with small
steps; otherwise (GPTQ's error-compensated codes) it starts at Q itself. Either way the start
state finalizes to exactly the init. Trade-off: the latent weights double a block's memory on
the device during training; the rest of the model never leaves its home device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mixbits.quant import kquant
from mixbits.quant.affine import FP16_MAX, FP16_TINY, QParams, dequantize, fake_quantize_ste, quantize
from mixbits.quant.ggml_ste import fake_quantize_ggml_ste, finalize_grid, start_grid
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec

__all__ = ["FinalLinear", "LinearStart", "QuantizedBlock", "clamp_ste", "finalize_linear", "start_of"]


@dataclass(frozen=True, eq=False)
class LinearStart:
    """Where training of one linear starts: latent weight [out, in] float32 and storable QParams
    (GGMLParams for a ggml type)."""

    spec: QuantSpec | GGMLSpec
    weight: Tensor
    qparams: QParams | GGMLParams


@dataclass(frozen=True, eq=False)
class FinalLinear:
    """A finished linear: storable QParams or GGMLParams (CPU) and the weight they write [out, in] float32."""

    qparams: QParams | GGMLParams
    weight: Tensor


def _on(params: GGMLParams, device: torch.device) -> GGMLParams:
    return GGMLParams(params.spec, *(t.to(device) for t in (params.d, params.dmin, params.sc, params.mn)))


def start_of(original: Tensor, written: Tensor, qparams: QParams | GGMLParams,
             spec: QuantSpec | GGMLSpec) -> LinearStart:
    """The start state reproducing `written` (the init's Q) exactly; see the module docstring."""
    original, written = original.detach().float(), written.detach().float()
    if isinstance(spec, GGMLSpec):
        qp = _on(qparams, original.device)
        rtn = kquant.dequantize(kquant.quantize(original, qp), qp)
        return LinearStart(spec, (original if torch.equal(rtn, written) else written).clone(), qp)
    qp = QParams(qparams.scale.float().to(original.device), qparams.zero.float().to(original.device))
    rtn = dequantize(quantize(original, qp, spec), qp, spec)
    latent = original if torch.equal(rtn, written) else written
    return LinearStart(spec, latent.clone(), qp)


def clamp_ste(x: Tensor, low: float, high: float) -> Tensor:
    """clamp(x) forward, identity gradient backward."""
    return x + (x.clamp(low, high) - x).detach()


def finalize_linear(weight: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec | GGMLSpec,
                    grid: GGMLParams | None = None) -> FinalLinear | None:
    """Round (s, z) to storable values and write the weight; None if any value is not finite.
    A ggml type: (s, z) are the sub-block scales and mins on the type's `grid` (`quant.ggml_ste`)."""
    weight, scale, zero = weight.detach().float(), scale.detach().float(), zero.detach().float()
    if not (torch.isfinite(weight).all() and torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        return None
    if isinstance(spec, GGMLSpec):
        params = finalize_grid(scale, zero, grid)
        written = kquant.dequantize(kquant.quantize(weight, params), params)
        return FinalLinear(_on(params, torch.device("cpu")), written)
    scale = scale.clamp(FP16_TINY, FP16_MAX).half().float()
    if spec.symmetric:
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        zero = zero.round().clamp(0, spec.maxq)
    qp = QParams(scale, zero)
    written = dequantize(quantize(weight, qp, spec), qp, spec)
    return FinalLinear(QParams(scale.cpu(), zero.cpu()), written)


class QuantizedBlock:
    """Trainable fake-quant state of one block's planned linears, and the block to run it in.

    block: the block to call (its own parameters are frozen and used as they are); keys: linear
    name -> parameter key inside the block (``self_attn.q_proj.weight``); transposed: linear
    name -> True for Conv1D layouts; starts: linear name -> LinearStart. Everything trainable
    lives in float32 on `device`.
    """

    def __init__(self, block: nn.Module, keys: Mapping[str, str], transposed: Mapping[str, bool],
                 starts: Mapping[str, LinearStart], device: torch.device) -> None:
        if set(keys) != set(starts):
            raise ValueError(f"keys name {sorted(keys)[:3]}... but starts name {sorted(starts)[:3]}...; "
                             "give one start per planned linear of the block")
        self.block = block.requires_grad_(False)
        self.keys, self.transposed, self.specs = dict(keys), dict(transposed), {n: s.spec for n, s in starts.items()}
        self.weight = {n: nn.Parameter(s.weight.to(device, torch.float32).clone()) for n, s in starts.items()}
        self.grid = {n: _on(s.qparams, device) for n, s in starts.items() if isinstance(s.spec, GGMLSpec)}
        self.scale: dict[str, nn.Parameter] = {}
        self.zero: dict[str, Tensor] = {}
        for n, s in starts.items():
            scale, zero = start_grid(self.grid[n]) if n in self.grid else (s.qparams.scale, s.qparams.zero)
            self.scale[n] = nn.Parameter(scale.to(device, torch.float32).clone())
            zero = zero.to(device, torch.float32).clone()
            self.zero[n] = zero if s.spec.symmetric else nn.Parameter(zero)

    def param_groups(self, quant_lr: float, weight_lr: Mapping[str, float]) -> list[dict]:
        """AdamW groups: one per linear for its weight (lr by its bits), one for all s and z."""
        groups = [{"params": [self.weight[n]], "lr": weight_lr[n], "name": n} for n in self.weight]
        quant = list(self.scale.values()) + [z for z in self.zero.values() if isinstance(z, nn.Parameter)]
        return groups + [{"params": quant, "lr": quant_lr, "name": "quant"}]

    def parameters(self) -> list[Tensor]:
        return [p for g in self.param_groups(1.0, {n: 1.0 for n in self.weight}) for p in g["params"]]

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def _as_stored(self, name: str, w: Tensor) -> Tensor:
        """[out, in] float32 -> the block parameter's layout and dtype."""
        dtype = self.block.get_parameter(self.keys[name]).dtype
        return (w.t() if self.transposed[name] else w).to(dtype)

    def fake_weights(self) -> dict[str, Tensor]:
        """Differentiable W_hat of every planned linear, keyed by block parameter key."""
        out = {}
        for n, spec in self.specs.items():
            if n in self.grid:
                w_hat = fake_quantize_ggml_ste(self.weight[n], self.scale[n], self.zero[n], self.grid[n])
            else:
                s = clamp_ste(self.scale[n], FP16_TINY, FP16_MAX)
                w_hat = fake_quantize_ste(self.weight[n], s, self.zero[n], spec)
            out[self.keys[n]] = self._as_stored(n, w_hat)
        return out

    def finalize(self) -> dict[str, FinalLinear] | None:
        """The storable state of every linear, or None if any linear has a non-finite value."""
        out = {}
        for n, spec in self.specs.items():
            final = finalize_linear(self.weight[n], self.scale[n], self.zero[n], spec, self.grid.get(n))
            if final is None:
                return None
            out[n] = final
        return out

    def stored_weights(self, final: Mapping[str, FinalLinear]) -> dict[str, Tensor]:
        """Block parameter key -> written weight of a finalized state, for `__call__`."""
        device = next(iter(self.weight.values())).device
        return {self.keys[n]: self._as_stored(n, f.weight.to(device)) for n, f in final.items()}

    def __call__(self, hidden: Tensor, args: tuple, kwargs: dict, weights: Mapping[str, Tensor]) -> Tensor:
        """The block's new hidden state with `weights` (key -> tensor) in place of its own."""
        out = functional_call(self.block, dict(weights), (hidden, *args), kwargs, strict=False)
        return out if isinstance(out, Tensor) else out[0]
