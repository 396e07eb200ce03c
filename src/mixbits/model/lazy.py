"""A checkpoint read one module at a time: the model skeleton on the meta device, weights from the shards.

Idea: a causal LM is an embedding, L identical blocks and a head, and every block-wise stage needs only
one of those pieces at a time. So the model is built without storage (accelerate's `init_empty_weights`:
every parameter on the meta device, shapes only, no custom code from the folder), and a piece's tensors
are read from the safetensors shards when that piece is worked on, cast to the compute dtype on the
compute device, and sent back to the meta device when done:

    materialize("model.layers.7")  ->  run block 7  ->  release("model.layers.7")

Reading: each tensor's offset comes from the shard's header (parsed and checked once, `safeload.
safetensors_header`), and its bytes are read with a plain file read into fresh memory, then cast. Not
through `safe_open`'s memory map: the pages a map touches stay resident in the process (file-backed)
until the shard closes, so reading a 7B block through a map costs its 0.4 GB again on top of its
float32 copy; a read goes through the page cache, which the kernel may drop, and is freed with the
buffer once cast. The only copy besides the result is one tensor in the checkpoint's dtype.

Peak memory of a pass over the blocks: one block's weights in the compute dtype plus the tensor being
read, plus what stays resident: buffers the model computes itself (rotary frequencies), and, only
inside `resident()`, everything outside the blocks (embeddings, final norm, head; tied embeddings are
held once; embedding and head in 16 bits where the checkpoint stores them so, model/upcast.py). For
Llama-2-7B in bfloat16 that is 0.81 GB per block in float32 and 0.52 GB outside, against 13.5 GB for
the whole model. Activations are the caller's.

Checks made before any tensor is read, each a `UserError` naming the file and the fix: a shard listed
in `model.safetensors.index.json` that is missing, a tensor the model needs that no shard holds, a
tensor whose shape disagrees with the config. A pickle-only checkpoint (`pytorch_model.bin`, sharded
or not) is converted once into safetensors in a cache folder with torch's weights-only loader, which
unpickles nothing but tensors and plain containers (model/checkpoint_files.py); the conversion is logged.

Trade-off: weights are read from disk once per pass per block (the page cache makes repeats cheap when
RAM allows); a module outside the blocks that must stay loaded across blocks is the caller's choice
(`resident()` is a context, not a default). `preload()` holds the whole checkpoint in RAM in its own
dtype instead (one read; every later pass casts from memory and reads no disk): the peak grows by the
checkpoint's bytes, for a machine whose RAM holds them and whose disk is slow or remote. The embedding
and head held in that dtype share the preloaded storage (read only: no stage trains or edits them);
every other tensor is a copy. Source: accelerate's big-model inference (meta skeleton,
`set_module_tensor_to_device`), llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.model.upcast import held_names, upcasting
from mixbits.model.checkpoint_files import TensorEntry, checkpoint_tensors, read_tensor

log = logging.getLogger(__name__)

__all__ = ["LazyCheckpoint", "open_checkpoint"]


def _load_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder / 'config.json'} cannot be read without running custom code from the folder "
                        f"({str(err).splitlines()[0]}); mixbits streams architectures that transformers ships "
                        f"(trust_remote_code stays off)") from err


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers are real: rotary tables are computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    model.tie_weights()  # from_config under init_empty_weights leaves tied pairs as two meta tensors
    for param in model.parameters():
        param.requires_grad_(False)  # inference first; the Fisher pass enables what it differentiates
    return model.eval()


def _candidates(name: str, prefix: str) -> tuple[str, ...]:
    """Checkpoint keys that may hold parameter `name` (with or without the base-model prefix)."""
    if prefix and name.startswith(prefix + "."):
        return name, name[len(prefix) + 1:]
    return (name, f"{prefix}.{name}") if prefix else (name,)


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


class LazyCheckpoint:
    """A local Hugging Face folder whose model lives on the meta device until a piece is materialized.

    Build with `open_checkpoint`. `model` is the skeleton (always the same object; its pieces change
    device); `block(i)` and `resident()` are contexts that materialize block i / everything outside the
    blocks on `device` in `compute_dtype` and release it to the meta device on exit.
    """

    def __init__(self, folder: Path, model: nn.Module, entries: dict[str, TensorEntry], *,
                 device: torch.device, compute_dtype: torch.dtype):
        from mixbits.model.arch import find_blocks

        self.folder, self.model, self.entries = folder, model, entries
        self.device, self.compute_dtype = device, compute_dtype
        self.block_path, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        self._aliases, self._keys = _tensor_groups(model, entries, folder)
        self._held = set(held_names(model)) & set(self._aliases)
        self._ram: dict[str, torch.Tensor] = {}  # checkpoint key -> tensor in its stored dtype (`preload`)

    @property
    def preloaded(self) -> bool:
        return bool(self._ram)

    def preload(self) -> int:
        """Read every tensor the model needs into RAM in its stored dtype (module docstring); later
        `materialize` calls cast from there and read no file. Returns the bytes held."""
        by_file: dict[Path, list[str]] = {}
        for key in sorted(set(self._keys.values())):
            by_file.setdefault(self.entries[key].file, []).append(key)
        for file, keys in by_file.items():
            with open(file, "rb", buffering=0) as handle:
                for key in sorted(keys, key=lambda k: self.entries[k].offset):
                    self._ram[key] = read_tensor(handle, self.entries[key])
        total = sum(t.numel() * t.element_size() for t in self._ram.values())
        log.info("preloaded %s: %.1f MiB held in RAM in the checkpoint's dtype", self.folder, total / 2**20)
        return total

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        """The floating dtype holding the most bytes in the checkpoint."""
        total: dict[torch.dtype, int] = {}
        for entry in self.entries.values():
            if entry.dtype.is_floating_point:
                total[entry.dtype] = total.get(entry.dtype, 0) + entry.nbytes
        return max(total, key=total.get) if total else self.compute_dtype

    def block_prefix(self, index: int) -> str:
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} does not exist; the model has blocks 0..{self.n_blocks - 1}")
        return f"{self.block_path}.{index}"

    def _names(self, prefix: str | None) -> list[str]:
        """Checkpoint-backed tensors under `prefix`; None: everything outside the blocks."""
        if prefix is None:
            return [n for n, al in self._aliases.items() if not any(_under(a, self.block_path) for a in al)]
        return [n for n, al in self._aliases.items() if any(_under(a, prefix) for a in al)]

    def nbytes(self, prefix: str | None, hold: torch.dtype | None = None) -> int:
        """Bytes of the tensors under `prefix` (None: outside the blocks) once materialized (`hold`: as
        `materialize`)."""
        total = 0
        for name in self._names(prefix):
            entry = self.entries[self._keys[name]]
            dtype = (self.held_dtype(name, hold) if prefix is None else None) or self.compute_dtype
            total += entry.nbytes // entry.dtype.itemsize * (dtype.itemsize if entry.dtype.is_floating_point
                                                               else entry.dtype.itemsize)
        return total

    def held_dtype(self, name: str, hold: torch.dtype | None = None) -> torch.dtype | None:
        """The dtype the embedding or head weight `name` is held in when materialized outside the blocks
        (None: not held, it takes the compute dtype): `hold` when given (rounding through it), else its
        stored dtype where that is a narrower float than the compute dtype (model/upcast.py)."""
        if name not in self._held:
            return None
        if hold is not None:
            return hold
        stored = self.entries[self._keys[name]].dtype
        return stored if stored.is_floating_point and stored.itemsize < self.compute_dtype.itemsize else None

    def materialize(self, prefix: str | None, hold: torch.dtype | None = None) -> nn.Module:
        """Read the tensors under `prefix` (a module name; "" for all, None for all outside the blocks)
        onto `device` in `compute_dtype`; returns that module (the whole model for "" and None).
        Outside the blocks (prefix None) the embedding and head weights are held in `held_dtype(name, hold)`."""
        from accelerate.utils import set_module_tensor_to_device

        by_file: dict[Path, list[str]] = {}
        for name in self._names(prefix):
            by_file.setdefault(self.entries[self._keys[name]].file, []).append(name)
        for file, names in by_file.items():
            with contextlib.ExitStack() as stack:
                handle = None if self._ram else stack.enter_context(open(file, "rb", buffering=0))
                for name in names:
                    key = self._keys[name]
                    value = self._ram[key] if self._ram else read_tensor(handle, self.entries[key])
                    held = self.held_dtype(name, hold) if prefix is None else None
                    dtype = (held or self.compute_dtype) if value.is_floating_point() else None
                    if self._ram and self.device.type == "cpu" and dtype in (None, value.dtype) and held is None:
                        value = value.clone()  # no cast would copy it: nothing done to a block reaches RAM
                    set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)
                    del value
                    self._share(name)
        self._move_buffers(prefix)
        return self.model.get_submodule(prefix) if prefix else self.model

    def release(self, prefix: str | None) -> None:
        """Send the tensors under `prefix` back to the meta device (their memory is freed)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self._names(prefix):
            set_module_tensor_to_device(self.model, name, "meta")
            self._share(name)

    def _share(self, name: str) -> None:
        """Point every alias of a tied tensor at the one just set (tied weights stay one tensor)."""
        owner, leaf = _split(self.model, name)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        for alias in self._aliases[name][1:]:
            module, alias_leaf = _split(self.model, alias)
            (module._parameters if alias_leaf in module._parameters else module._buffers)[alias_leaf] = table[leaf]

    def _move_buffers(self, prefix: str | None) -> None:
        """Buffers the model computes itself (not in the checkpoint) follow their module to `device`."""
        for name, buffer in list(self.model.named_buffers()):
            inside = _under(name, prefix) if prefix is not None else not _under(name, self.block_path)
            if inside and name not in self._aliases and buffer.device != self.device and buffer.device.type != "meta":
                module, leaf = _split(self.model, name)
                module._buffers[leaf] = buffer.to(self.device)

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block `index` materialized for the duration."""
        prefix = self.block_prefix(index)
        module = self.materialize(prefix)
        try:
            yield module
        finally:
            self.release(prefix)

    @contextlib.contextmanager
    def resident(self, hold: torch.dtype | None = None) -> Iterator[nn.Module]:
        """Everything outside the blocks (embeddings, final norm, head) materialized; yields the model.
        The embedding and head weights are held in 16 bits where the checkpoint stores them so (or in
        `hold`: rounded through it) and compute in the compute dtype (model/upcast.py: same values)."""
        self.materialize(None, hold)
        try:
            with upcasting(self.model, self.compute_dtype):
                yield self.model
        finally:
            self.release(None)


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _tensor_groups(model: nn.Module, entries: dict[str, TensorEntry], folder: Path):
    """(canonical name -> all alias names, canonical name -> checkpoint key), checking that every
    parameter has a tensor of the right shape in the checkpoint."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    groups: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        shapes[id(param)] = tuple(param.shape)
    buffers = [(n, b) for n, b in model.named_buffers(remove_duplicate=False)]
    aliases, keys, missing = {}, {}, []
    for ident, names in groups.items():
        key = next((k for n in names for k in _candidates(n, prefix) if k in entries), None)
        if key is None:
            missing.append(names[0])
            continue
        if entries[key].shape != shapes[ident]:
            raise UserError(f"{entries[key].file}: tensor {key!r} has shape {list(entries[key].shape)} but the "
                            f"config in {folder} needs {list(shapes[ident])}; the config and the weights belong "
                            f"to different models: re-download them together")
        aliases[names[0]], keys[names[0]] = tuple(names), key
    if missing:
        raise UserError(f"the checkpoint in {folder} has no tensor for {len(missing)} parameter(s) the model needs, "
                        f"e.g. {', '.join(missing[:3])}; the weights are incomplete or from another architecture: "
                        f"re-download the full checkpoint")
    for name, buffer in buffers:  # persistent buffers stored in the checkpoint are loaded like parameters
        key = next((k for k in _candidates(name, prefix) if k in entries), None)
        if key is not None and entries[key].shape == tuple(buffer.shape):
            aliases[name], keys[name] = (name,), key
    return aliases, keys


def open_checkpoint(
    folder: str | Path,
    *,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    preload: bool = False,
) -> LazyCheckpoint:
    """The lazy view of a local HF causal-LM folder, every check done before any tensor is read.

    `compute_dtype` default: float32 on the CPU, the checkpoint's own dtype elsewhere. `cache_dir`:
    where a pickle-only checkpoint is converted (default `<mixbits home>/converted`). `preload`: hold
    the whole checkpoint in RAM in its own dtype (`LazyCheckpoint.preload`).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist; pass a local folder written by save_pretrained")
    device = torch.device(device)
    config = _load_config(folder)
    entries = checkpoint_tensors(folder, cache_dir=cache_dir)
    if compute_dtype is None:
        floating = [e for e in entries.values() if e.dtype.is_floating_point]
        stored = max(floating, key=lambda e: e.nbytes).dtype if floating else torch.float32
        compute_dtype = torch.float32 if device.type == "cpu" else stored
    checkpoint = LazyCheckpoint(folder, _skeleton(config, compute_dtype), entries, device=device,
                                compute_dtype=compute_dtype)
    log.info("streaming %s: %d blocks of up to %.1f MiB, %.1f MiB outside them, read as %s on %s", folder,
             checkpoint.n_blocks, max(checkpoint.nbytes(checkpoint.block_prefix(i))
                                      for i in range(checkpoint.n_blocks)) / 2**20,
             checkpoint.nbytes(None) / 2**20, str(compute_dtype).removeprefix("torch."), device)
    if preload:
        checkpoint.preload()
    return checkpoint
