"""mixbits' native format, sharded by block and written block by block ("mixbits.native/2").

Layout of a native folder:
    model-block-00000.safetensors ...   one shard per transformer block: for each quantized
                                        linear `{name}.qweight` (uint8 bitstream of the [out, in]
                                        codes, row-major), `{name}.scales` (fp16 [out, G]),
                                        `{name}.qzeros` (uint8 bitstream of the [out, G] zero
                                        codes, empty when symmetric), `{name}.bias` (fp16); a
                                        linear planned as a ggml type: `{name}.qweight` uint8
                                        [out, in / block * type_size], its GGUF blocks byte for byte
                                        (the type is the plan's; `quant.ggml_linear`), and its bias;
                                        every other tensor of the block (norms, kept linears) in fp16
    model-rest.safetensors              everything outside the blocks (embeddings, final norm,
                                        head), fp16; tied copies are left out
    model.safetensors.index.json        Hugging Face's index: every tensor -> its shard
    mixbits.json                        format tag, the plan, tied names, the blocks' path and count
    progress.json                       the shards finished so far (bytes, sha256): what a resume trusts
    config.json (+ tokenizer files)
Within a shard the tensors are in name order (`shard_file.write_shard`), so a shard's bytes are a
function of its tensors alone and `native_size_of` computes every file's size from shapes.

Writing (`NativeWriter`): each block's shard is written atomically (`mixbits.io.atomic_file`), then
listed in progress.json (atomically too). A block is done iff progress.json lists its shard and the
shard on disk has the listed size and a valid header; so a kill at any moment leaves either a
finished block or one that `done_blocks` reports as not done and the next writer redoes (a shard
truncated or damaged afterwards included). `finish()` writes the index, mixbits.json, config and
tokenizer, and the folder's manifest (`mixbits.outdir`) lists its files, as every mixbits output does.
Peak memory of the writer: the tensors of the block being written.

Bytes on disk of the shards (sum of the .safetensors files) are what results report as the size.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from mixbits.errors import UserError
from mixbits.export.shard_file import TensorMeta, file_nbytes, read_header, write_shard
from mixbits.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from mixbits.outdir import MANIFEST, Manifest, files_under, read_manifest
from mixbits.plan import Plan
from mixbits.quant.packed import packed_shapes, packed_tensors
from mixbits.quant.spec import QuantSpec
from mixbits.safeload import check_safetensors

log = logging.getLogger(__name__)

NATIVE_FORMAT = "mixbits.native/2"
INDEX = "model.safetensors.index.json"
REST = "model-rest.safetensors"
PROGRESS = "progress.json"
SHARD_METADATA = {"format": "pt"}  # what transformers expects in a safetensors header
__all__ = ["INDEX", "NATIVE_FORMAT", "NativeWriter", "block_file", "native_size_of", "packed_tensors", "shard_metas"]


def block_file(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def infer_block_path(layer_names: Iterable[str]) -> str | None:
    """The blocks' module path ("model.layers") from linear names inside them ("model.layers.0.mlp.up")."""
    for name in layer_names:
        match = re.match(r"(.+?)\.\d+\.", name)
        if match:
            return match.group(1)
    return None


def block_of(name: str, block_path: str | None) -> int | None:
    """The block index of a tensor name, None for tensors outside the blocks."""
    if block_path is None or not name.startswith(block_path + "."):
        return None
    head = name[len(block_path) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def packed_metas(name: str, out_features: int, in_features: int, spec: QuantSpec,
                 has_bias: bool) -> dict[str, TensorMeta]:
    """The metas `packed_tensors` produces for a layer of this shape, without packing anything."""
    return {k: TensorMeta(shape, dtype) for k, (shape, dtype) in
            packed_shapes(name, out_features, in_features, spec, has_bias).items()}


def stored(tensor: Tensor) -> Tensor:
    """A plain tensor as the native format holds it: floats in fp16, on the CPU, contiguous."""
    tensor = tensor.detach().cpu()
    return (tensor.half() if tensor.is_floating_point() else tensor).contiguous()


def _stored_meta(tensor) -> TensorMeta:
    meta = TensorMeta.of(tensor)
    return TensorMeta(meta.shape, torch.float16) if meta.dtype.is_floating_point else meta


def shard_metas(shapes: Mapping[str, tuple[int, int]], plan: Plan, tensors: Mapping[str, object],
                block_path: str | None = None) -> dict[str, dict[str, TensorMeta]]:
    """File name -> the metas it will hold (name order), for a model whose linears have `shapes`
    and whose plain tensors are `tensors` (name -> anything with .shape/.dtype, tied copies left out)."""
    block_path = block_path or infer_block_path(shapes)
    quantized = plan.quantized()
    files: dict[str, dict[str, TensorMeta]] = {}

    def put(name: str, meta: TensorMeta) -> None:
        index = block_of(name, block_path)
        files.setdefault(REST if index is None else block_file(index), {})[name] = meta

    for name, spec in quantized.items():
        out_features, in_features = shapes[name]
        for key, meta in packed_metas(name, out_features, in_features, spec, f"{name}.bias" in tensors).items():
            put(key, meta)
    replaced = {f"{n}.{s}" for n in quantized for s in ("weight", "bias")}
    for name, tensor in tensors.items():
        if name not in replaced:
            put(name, _stored_meta(tensor))
    return {f: dict(sorted(m.items())) for f, m in sorted(files.items())}


def native_size_of(shapes: Mapping[str, tuple[int, int]], plan: Plan, tensors: Mapping[str, object],
                   block_path: str | None = None) -> int:
    """Bytes of the shards a native save of this model and plan writes, headers included, computed
    from shapes (the cost model's `layer_storage_bytes` per layer, plus every plain tensor in fp16,
    plus each shard's header): no tensor is packed or written. `tensors`: every tensor of the model
    by name, unpacked (a meta-device skeleton's state_dict will do), tied copies left out."""
    return sum(file_nbytes(metas, SHARD_METADATA) for metas in shard_metas(shapes, plan, tensors, block_path).values())


def _progress_key(plan: Plan, provenance: Mapping[str, object]) -> str:
    return json.dumps({"format": NATIVE_FORMAT, "plan": plan.to_dict(), "provenance": dict(provenance)},
                      sort_keys=True, default=str)


class NativeWriter:
    """Writes a native folder block by block; see the module docstring.

    out_dir: the folder (inside a claimed run folder, usually RUN/model); plan; config: the model's
    transformers config; n_blocks / block_path: the blocks (default: config.num_hidden_layers and
    the path the plan's layer names show). provenance: what else the blocks depend on (model,
    quantizer and its settings, calibration data, code version); finished blocks are trusted only
    by a writer with the same plan and provenance. resume=False starts over even where progress exists."""

    def __init__(self, out_dir: str | Path, plan: Plan, config, tokenizer=None, *, n_blocks: int | None = None,
                 block_path: str | None = None, resume: bool = True,
                 provenance: Mapping[str, object] | None = None) -> None:
        self.out_dir, self.plan, self.config, self.tokenizer = Path(out_dir), plan, config, tokenizer
        self._key = _progress_key(plan, provenance or {})
        self.block_path = block_path or infer_block_path(plan.specs)
        self.n_blocks = int(n_blocks if n_blocks is not None else config.num_hidden_layers)
        if self.block_path is None:
            raise ValueError("the blocks' module path is not known: pass block_path (e.g. 'model.layers')")
        self._refuse_foreign()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        self._progress = self._read_progress() if resume else {}

    def _refuse_foreign(self) -> None:
        if not self.out_dir.is_dir() or read_manifest(self.out_dir) is not None:
            return
        foreign = [f for f in files_under(self.out_dir) if not f.startswith(".mixbits") and f != PROGRESS]
        if foreign:
            raise UserError(f"{self.out_dir} holds files that mixbits did not write ({', '.join(foreign[:3])}); "
                            "mixbits writes its model only into a new folder or its own: choose another folder")

    def _read_progress(self) -> dict[str, dict]:
        path = self.out_dir / PROGRESS
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (ValueError, OSError):
            log.warning("%s is unreadable; every block is written again", path)
            return {}
        if data.get("key") != self._key:
            if data:
                log.warning("%s is the progress of another plan or quantizer; every block is written again", path)
            return {}
        return dict(data.get("shards", {}))

    def _valid(self, file: str) -> bool:
        record, path = self._progress.get(file), self.out_dir / file
        if record is None or not path.is_file():
            return False
        try:
            check_safetensors(path, "shard")
        except UserError:
            log.warning("%s is damaged or truncated; its block is written again", path)
            return False
        if path.stat().st_size != record["bytes"]:
            log.warning("%s is not the shard that progress.json lists; its block is written again", path)
            return False
        return True

    def done_blocks(self) -> set[int]:
        """The blocks whose shards are finished (listed in progress.json and intact on disk)."""
        return {i for i in range(self.n_blocks) if self._valid(block_file(i))}

    def rest_done(self) -> bool:
        return self._valid(REST)

    def _record(self, file: str, sha256: str, tied: Mapping[str, str] | None = None) -> None:
        self._progress[file] = {"bytes": (self.out_dir / file).stat().st_size, "sha256": sha256,
                                **({"tied": dict(tied)} if tied is not None else {})}
        atomic_write_json(self.out_dir / PROGRESS, {"key": self._key, "shards": self._progress})
        self._save_manifest(finished=False)

    def _save_manifest(self, finished: bool) -> None:
        files = tuple(f for f in files_under(self.out_dir) if f != MANIFEST and not f.startswith(".mixbits"))
        Manifest(kind="native", command="native", started=self._started,
                 finished=time.time() if finished else None, files=files).save(self.out_dir)

    def write_block(self, index: int, tensors: Mapping[str, Tensor]) -> None:
        """Write block `index`: its quantized linears packed (`packed_tensors`), every other tensor of
        the block plain (stored in fp16). Durable when it returns."""
        if not 0 <= index < self.n_blocks:
            raise ValueError(f"block {index} does not exist; this model has blocks 0..{self.n_blocks - 1}")
        prefix = f"{self.block_path}.{index}."
        outside = [n for n in tensors if not n.startswith(prefix)]
        if outside:
            raise ValueError(f"block {index} was given tensors outside {prefix}*, e.g. {outside[:3]}")
        for name in (n for n in self.plan.quantized() if n.startswith(prefix)):
            if f"{name}.qweight" not in tensors or f"{name}.weight" in tensors:
                raise ValueError(f"layer {name} is quantized by the plan: give its packed tensors "
                                 "(`packed_tensors`), not its weight")
        sha = write_shard(self.out_dir / block_file(index), {k: stored(v) for k, v in tensors.items()},
                          SHARD_METADATA)
        self._record(block_file(index), sha)

    def write_rest(self, tensors: Mapping[str, Tensor], tied: Mapping[str, str] | None = None) -> None:
        """Write everything outside the blocks; `tied` maps a left-out name to the name it equals."""
        inside = [n for n in tensors if block_of(n, self.block_path) is not None]
        if inside:
            raise ValueError(f"write_rest was given tensors of blocks, e.g. {inside[:3]}; use write_block")
        sha = write_shard(self.out_dir / REST, {k: stored(v) for k, v in tensors.items()}, SHARD_METADATA)
        self._record(REST, sha, tied or {})

    def read_block(self, index: int) -> dict[str, Tensor]:
        """The tensors of a finished block, as written (a resumed run continues from them)."""
        if not self._valid(block_file(index)):
            raise ValueError(f"block {index} is not finished in {self.out_dir}; see done_blocks()")
        return load_file(str(self.out_dir / block_file(index)))

    def finish(self) -> int:
        """Write the index, mixbits.json, config and tokenizer; returns the bytes of the shards."""
        missing = sorted(set(range(self.n_blocks)) - self.done_blocks())
        if missing or not self.rest_done():
            raise RuntimeError(f"the native folder {self.out_dir} is incomplete: blocks {missing[:10]} "
                               f"{'and the rest ' if not self.rest_done() else ''}are not written")
        files = [block_file(i) for i in range(self.n_blocks)] + [REST]
        weight_map = {name: f for f in files for name in read_header(self.out_dir / f)}
        data = sum(m.nbytes for f in files for m in read_header(self.out_dir / f).values())
        atomic_write_json(self.out_dir / INDEX, {"metadata": {"total_size": data, "format": NATIVE_FORMAT},
                                                 "weight_map": weight_map})
        atomic_write_json(self.out_dir / "mixbits.json", {
            "format": NATIVE_FORMAT, "plan": self.plan.to_dict(), "tied": self._progress[REST].get("tied", {}),
            "blocks": {"path": self.block_path, "count": self.n_blocks}})
        atomic_write_text(self.out_dir / "config.json", self.config.to_json_string())
        if self.tokenizer is not None:
            with tempfile.TemporaryDirectory(prefix="mixbits-tokenizer-") as tmp:
                for path in self.tokenizer.save_pretrained(tmp):
                    if Path(path).is_file():
                        atomic_write_bytes(self.out_dir / Path(path).name, Path(path).read_bytes())
        self._save_manifest(finished=True)
        return sum((self.out_dir / f).stat().st_size for f in files)
