"""The stages of `mixbits run` that stream the model block by block (`RunConfig.stream`, the default).

`pipeline.run` chains them; each works on a `BlockSource` (a lazy checkpoint read from the shards,
or a loaded model), never on a copy of the model:

    open        the skeleton on the meta device (`model.lazy.open_checkpoint`) and the tokenizer;
                linears, shapes, tied groups and fixed bytes from the skeleton alone
    Fisher      `sensitivity.methods.cached_tables` on the source, which runs
                `sensitivity.fisher_streamed.streamed_fisher_table` (boundaries in memory, or on disk
                under `offload_dir`); the quantizer's gain `sensitivity.follow.gain_table` block by block
    variants    the original's evaluation once (its log-probs kept for KL and top-1), then ONE pass per
                variant (`model.quantize_streamed`): the mixed plan into the native writer
                (`export.native_shards.NativeWriter`, resumable block by block), each uniform baseline
                evaluated only; sizes from the cost model (`native_size_of`), never from a written copy
    zero-shot   (cfg.tasks) the original and the written mixed model, one at a time, each placed by
                accelerate within --max-memory (`model.dispatch`: blocks beyond it on disk)

Peak memory: the largest of the stages' peaks (see each module's docstring; `model/budget.py`
predicts it), about one block plus the activations at one block boundary; never the whole model.

Not streamed yet (they need a whole model; `whole_model_reasons` names them and `pipeline.run`
loads the whole model for them, saying so): iterative mode and --qat training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mixbits.config import RunConfig
from mixbits.devices import compute_torch_dtype
from mixbits.data.windows import text_fingerprint
from mixbits.eval.perplexity import EvalResult
from mixbits.eval.streamed import Scorer, score_reference
from mixbits.export.native_shards import NativeWriter, native_size_of
from mixbits.model.lazy import open_checkpoint
from mixbits.model.load import check_finite_weights, with_pad_token
from mixbits.model.quantize import QuantizeReport
from mixbits.model.quantize_streamed import quantize_streamed
from mixbits.model.stream import BlockSource
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.damage_rows import damage_row_options
from mixbits.sensitivity.methods import cached_tables
from mixbits.sensitivity.table import DamageTable
from mixbits.timing import StageTimer

log = logging.getLogger(__name__)

__all__ = ["boundaries_folder", "open_streamed", "run_variants", "stored_tensors", "streamed_fisher",
           "streamed_zeroshot", "whole_model_reasons", "writer_provenance"]


def whole_model_reasons(cfg: RunConfig) -> list[str]:
    """The options of `cfg` that still need the whole model in memory (not streamed yet)."""
    reasons = []
    if cfg.iterative is not None:
        reasons.append("--iterative")
    if cfg.train is not None:
        reasons.append("--qat")
    return reasons


def local_folder(source: str, name: str) -> Path:
    """The local folder of a resolved model source (a folder already, or a hub id in the local cache;
    fetched like `from_pretrained` would when the hub is reachable)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from mixbits.model.load import _hub_offline, _load_error

    try:
        return Path(snapshot_download(source, local_files_only=_hub_offline(),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]))
    except OSError as err:
        raise _load_error(err, source, name, _hub_offline()) from err


def open_streamed(name: str, source: str, device: torch.device, compute_dtype: str | None = None,
                  preload: bool = False) -> tuple["FiniteChecked", object]:
    """The lazy checkpoint of `source` (a resolved model source; `name`: the model as the user gave it,
    for messages), computed on `device` in `compute_dtype` (a `--compute-dtype` name; None: the
    device's default), its pieces checked for NaN and inf as they are first read, and its tokenizer
    (with a pad token); `preload`: the checkpoint held in RAM (`LazyCheckpoint.preload`). Used by
    `mixbits run` and `mixbits analyze`."""
    from transformers import AutoTokenizer

    folder = local_folder(source, name)
    checkpoint = open_checkpoint(folder, device=device, compute_dtype=compute_torch_dtype(compute_dtype),
                                 preload=preload)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with_pad_token(tokenizer)
    return FiniteChecked(checkpoint, name), tokenizer


class FiniteChecked:
    """A block source whose pieces are checked for NaN and inf the first time each is materialized
    (`model.load.check_finite_weights`, which the whole-model path runs at load): a broken
    checkpoint is refused, naming the tensors, in the first pass over the blocks instead of after
    a full read. `inner`: the source it wraps."""

    def __init__(self, inner: BlockSource, name: str):
        self.inner, self.name, self._checked = inner, name, set()
        self.model, self.device = inner.model, inner.device
        self.n_blocks, self.block_path = inner.n_blocks, inner.block_path

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        with self.inner.block(index) as module:
            self._check(index, module, f"{self.block_path}.{index}")
            yield module

    @contextlib.contextmanager
    def resident(self, hold: torch.dtype | None = None) -> Iterator[nn.Module]:
        with self.inner.resident(hold) as model:
            self._check(None, model, "")
            yield model

    def __getattr__(self, name: str):  # the rest of the source's interface (compute_dtype, nbytes, ...)
        return getattr(self.inner, name)

    def _check(self, key, module: nn.Module, prefix: str) -> None:
        if key not in self._checked:
            check_finite_weights(module, self.name, prefix)
            self._checked.add(key)


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the export stores (parameters and persistent buffers), tied copies once, by name:
    works on a meta skeleton, where storage pointers cannot tell tied tensors apart (object identity can)."""
    saved = set(model.state_dict())
    tensors = dict(model.named_parameters())  # remove_duplicate: a tied tensor under its first name
    tensors.update((n, b) for n, b in model.named_buffers() if n in saved)
    return tensors


def streamed_fisher(cfg: RunConfig, source: BlockSource, calib: torch.Tensor, linears,
                    configs: tuple[QuantSpec, ...]) -> DamageTable:
    """The Fisher table of `mixbits analyze --methods fisher`, computed block by block by the one
    builder (`sensitivity.methods.cached_tables`), so the whole-model run's cached table serves it
    and the other way round; the block boundaries on disk under cfg.offload_dir when it is set.
    The returned table (not the cached one) says `streamed: True` when this run computed it."""
    with boundaries_folder(cfg.offload_dir) as folder:
        tables, cached = cached_tables(["fisher"], source, calib, linears, configs, model_name=cfg.model,
                                       device=source.device, progress=cfg.progress, use_cache=cfg.use_cache,
                                       options=damage_row_options(["fisher"], configs, cfg.damage_rows),
                                       offload_dir=folder)
    return tables["fisher"] if "fisher" in cached else tables["fisher"].with_meta(streamed=True)


@contextlib.contextmanager
def boundaries_folder(offload_dir: Path | None) -> Iterator[Path | None]:
    """A fresh folder under `offload_dir` for the streamed Fisher's block boundaries (None: they stay in
    memory), removed afterwards; one per job, so two jobs sharing an offload folder never mix files."""
    if offload_dir is None:
        yield None
        return
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fisher-boundaries-", dir=offload_dir, ignore_cleanup_errors=True) as folder:
        yield Path(folder)


def writer_provenance(cfg: RunConfig, calib: torch.Tensor) -> dict:
    """What the mixed model's packed blocks depend on besides the plan (`NativeWriter(provenance=)`):
    the model, the quantizer and its settings, the compute dtype and the calibration windows (not for
    rtn, which reads none), so a resume with any of them changed writes every block again."""
    uses_data = cfg.quantizer != "rtn"
    return {"model": cfg.model, "quantizer": cfg.quantizer, "compute_dtype": cfg.compute_dtype,
            "gptq": dataclasses.asdict(cfg.gptq) if cfg.quantizer == "gptq" else None,
            "calibration_sha256": text_fingerprint(calib) if uses_data else None}


def run_variants(cfg: RunConfig, source: BlockSource, tokenizer, plans: dict[str, Plan], shapes,
                 calib: torch.Tensor, test: torch.Tensor, out: Path, timer: StageTimer
                 ) -> tuple[dict[str, EvalResult], dict[str, QuantizeReport], dict[str, int]]:
    """Evaluate the original once (timer stage "evaluate"), then quantize and evaluate each variant in
    one streamed pass ("quantize"; its evaluation included), the mixed plan written to `out` as it
    goes; finish the folder and size the others from the cost model ("save").
    Returns (evaluations, quantizer reports, bytes on disk)."""
    scorer = Scorer(test, device=source.device)
    with timer.stage("evaluate"):
        evals = {"original": score_reference(source, scorer, progress=cfg.progress)}
    reports: dict[str, QuantizeReport] = {}
    writer = None
    with timer.stage("quantize"):
        for name, plan in plans.items():
            if name == "original":
                continue
            if name == "mixed":
                writer = NativeWriter(out, plan, source.model.config, tokenizer, n_blocks=source.n_blocks,
                                      block_path=source.block_path, resume=cfg.resume,
                                      provenance=writer_provenance(cfg, calib))
            done = quantize_streamed(source, plan, quantizer=cfg.quantizer, scorer=scorer, name=name,
                                     windows=None if cfg.quantizer == "rtn" else calib, gptq=cfg.gptq,
                                     sink=writer if name == "mixed" else None,
                                     progress=cfg.progress)
            if done.resumed:
                log.info("%s: blocks %s were finished by an earlier run; read back from %s", name,
                         list(done.resumed), out)
            evals[name], reports[name] = done.evaluation, done.report
    with timer.stage("save"):
        tensors = stored_tensors(source.model)
        sizes = {name: native_size_of(shapes, plan, tensors, source.block_path) for name, plan in plans.items()
                 if name != "mixed"}
        if writer is not None:
            sizes["mixed"] = writer.finish()
    return evals, reports, sizes


def streamed_zeroshot(cfg: RunConfig, source: BlockSource, tokenizer, model_dir: Path, timer: StageTimer) -> dict:
    """Zero-shot tasks (cfg.tasks) of the original checkpoint and the mixed model just written to
    `model_dir`, one at a time, each placed by accelerate within cfg.max_memory (`model.dispatch`;
    whole on the device without a budget), offloaded pieces under cfg.offload_dir (default: a
    temporary folder), removed afterwards."""
    from mixbits.eval.zeroshot import evaluate_zeroshot
    from mixbits.model.budget import RUNTIME_BYTES
    from mixbits.jobs.zeroshot import load_mixed
    from mixbits.model.dispatch import accelerate_budget, load_original

    device, dtype = source.device, source.compute_dtype
    budget = accelerate_budget(cfg.max_memory, device, reserve=RUNTIME_BYTES)
    root = cfg.offload_dir
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zeroshot-offload-", dir=root, ignore_cleanup_errors=True) as folder:
        models = {
            "original": lambda: load_original(source.folder, device=device, dtype=dtype, budget=budget,
                                              offload_dir=Path(folder) / "original"),
            "mixed": lambda: load_mixed(model_dir, device=device, dtype=dtype, budget=budget,
                                        offload_dir=Path(folder) / "mixed"),
        }
        with timer.stage("zeroshot"):
            return evaluate_zeroshot(models, tokenizer, cfg.tasks, device=device, limit=cfg.task_limit,
                                     seed=cfg.data.seed, progress=cfg.progress)
