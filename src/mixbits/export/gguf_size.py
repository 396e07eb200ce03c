"""The bytes of a GGUF file, known before it is written: what a size budget for GGUF counts.

A GGUF file is, in order: a 24-byte header, the metadata (architecture, hyper-parameters, the
tokenizer's whole vocabulary, merges and special ids), the tensor table (name, shape, type and
offset of every tensor), padding to the data alignment (32 bytes), then every tensor's data,
each padded to the alignment. llama.cpp maps exactly these bytes. So

    file bytes = pad(header + metadata + table) + Σ_tensors pad(tensor bytes)

`gguf_file_bytes` gets the first term by building the writer's own metadata and tensor table
(`gguf_layout.gguf_layout`, what `write_gguf_from` writes) and serialising them into memory
(`GGUFLayout.file_bytes`), and the second from the same tensor table: no type choice is
repeated here.

For allocation the file splits into what the plan decides and what it does not. A planned
layer's weight tensor takes pad(bytes of its type) (`gguf_weight_bytes`, None where GGUF cannot
store the spec on that row); everything else (embeddings and output head in F16, norms and
biases in F32, header, metadata, table, padding) is `GGUFSize.fixed`, the same for every plan:
the table's entries have a fixed size whatever the type, and `general.file_type` is one uint32.
So `fixed + Σ_layers gguf_weight_bytes` is the file's exact size (tested against written files).

Two inputs change the metadata and so the size by their length: `general.name` (the writer
takes the file's stem: "model" for `mixbits export`'s default `model.gguf`) and
`tokenizer.ggml.pre`. A prediction is exact for the name and pre it is given.

Cost: one pass over the tokenizer (saved to a temporary folder and read back, as the writer
does) and the metadata serialised in memory (a few MB for a 150k vocabulary); no tensor data
is touched, so the model may be a skeleton on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import gguf
import torch
from torch import nn

from mixbits.export.from_native import model_source
from mixbits.export.gguf_layout import RULES, gguf_layout, weight_info
from mixbits.export.native import skeleton
from mixbits.export.rules import spec_problem
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.spec import KEEP, GGMLSpec, QuantSpec

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # the writer never sets general.alignment


def _pad(n: int) -> int:
    return gguf.GGUFWriter.ggml_pad(n, ALIGNMENT)


def gguf_weight_bytes(shape: tuple[int, int], spec: QuantSpec | GGMLSpec) -> int | None:
    """Bytes an [out, in] layer's weight takes in the file under `spec`, padding included;
    None when GGUF cannot store that spec on that row (`rules.spec_problem`)."""
    if spec_problem(RULES, spec, shape) is not None:
        return None
    return _pad(weight_info(shape, spec).nbytes)


def gguf_file_bytes(model: nn.Module, plan: Plan, tokenizer=None, *, tokenizer_pre: str = "default",
                    name: str = "model") -> int:
    """Exact size in bytes of the file `write_gguf(model, plan, <dir>/<name>.gguf, tokenizer,
    tokenizer_pre=...)` writes, without writing it. `model` may be a meta skeleton.
    ExportError when the plan cannot be written (as the writer would raise)."""
    return gguf_layout(model_source(model, plan, tokenizer=tokenizer), tokenizer_pre=tokenizer_pre,
                       name=name).file_bytes()


@dataclass(frozen=True)
class GGUFSize:
    """A model's GGUF file size as the plan sees it: `fixed` bytes whatever the plan, plus each
    block linear's weight in its type (`gguf_weight_bytes`). `shapes`: (out, in) per linear."""

    fixed: int
    shapes: Mapping[str, tuple[int, int]]

    def file_bytes(self, plan: Plan) -> int:
        """The exact file size of `plan` (a layer the plan leaves out is kept in F16); ValueError
        naming the layer for a spec GGUF cannot store there."""
        total = self.fixed
        for layer, shape in self.shapes.items():
            spec = plan.specs.get(layer, KEEP)
            size = gguf_weight_bytes(shape, spec)
            if size is None:
                raise ValueError(f"{layer}: GGUF cannot store {spec.label} on a {list(shape)} weight "
                                 f"({spec_problem(RULES, spec, shape)})")
            total += size
        return total


def meta_model(config) -> nn.Module:
    """A skeleton of `config` on the meta device (no storage) with its ties in place (an
    untied output head is a tensor of the file, a tied one is not)."""
    with torch.device("meta"):
        return skeleton(config)


def gguf_size(model: nn.Module, tokenizer=None, *, tokenizer_pre: str = "default", name: str = "model") -> GGUFSize:
    """The split of `gguf_file_bytes` for allocation, measured on the all-F16 plan of `model`
    (`meta_model(config)` is enough)."""
    shapes = layer_shapes(model)
    kept = Plan.uniform(shapes, KEEP)
    total = gguf_file_bytes(model, kept, tokenizer, tokenizer_pre=tokenizer_pre, name=name)
    return GGUFSize(total - sum(gguf_weight_bytes(s, KEEP) for s in shapes.values()), dict(shapes))
