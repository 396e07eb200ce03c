"""CPU math that does not depend on the thread count: Intel MKL's strict reproducibility mode.

MKL, torch's CPU BLAS, splits a matrix product's inner dimension across threads when that
dimension is long next to the output, and the rounding of the sum then follows the split.
Measured with torch 2.13 on this project's CPU, 1 against 2 threads: 64-128 tokens through a
1536 -> 576 down_proj, the lm_head backward over a 49 152-entry vocabulary (so every Fisher
gradient, by ~1e-6), XᵀX of a narrow layer over 8192 tokens. Once such a difference enters the
sequential GPTQ loop, its rounding decisions amplify it: a uniform w3g128 GPTQ+clip SmolLM2-135M
calibrated on 4 x 128 tokens kept identical scales on 8 of 210 layers, with perplexities 54.86
and 50.59.

`MKL_CBWR=AUTO,STRICT` (MKL's "strict conditional numerical reproducibility") makes gemm, trsm
and symm bit-identical at any thread count, on the CPU's own fastest code path; measured cost:
none to 15 % on one thread, up to ~1.5x on threaded products with a long inner dimension (they
no longer split it). LAPACK is not covered: `quant.gptq` runs its Cholesky on one thread.
With both, the same setting as above (blocks 0-5, 42 layers) came out bit-identical at 1 and 2
threads, weights and perplexity (22.1240 both), and so did the Fisher of all 210 linears.

MKL reads the variable once, at its first call, so it is set when mixbits is imported: before
any torch math in a `mixbits` command or a script that imports mixbits first (a notebook that
ran torch math before importing mixbits keeps MKL's default). A value already set is kept:
`MKL_CBWR=AVX2,STRICT` also gives the same numbers on AVX2 and AVX-512 CPUs (their default
code paths round differently), at ~2x the GEMM time on AVX-512 machines.
"""

from __future__ import annotations

import os

MKL_MODE = "AUTO,STRICT"


def request_reproducible_mkl() -> str:
    """Set MKL_CBWR to `MKL_MODE` unless the user set it; returns the value in force."""
    return os.environ.setdefault("MKL_CBWR", MKL_MODE)


request_reproducible_mkl()
