"""What an export reads, part by part, from a run's native folder: the sizes `model.budget_stages.
predict_export` needs, from the headers and the plan alone (no tensor is read)."""

from __future__ import annotations

from mixbits.export.from_native import StoredSource
from mixbits.export.native_shards import packed_metas
from mixbits.model.apply import layer_shapes
from mixbits.model.budget_stages import StoredPart

__all__ = ["stored_parts"]


def stored_parts(source: StoredSource) -> tuple[StoredPart, ...]:
    """Each part `source.parts()` gives, in order, with its stored bytes and its planned layers' sizes."""
    shapes = layer_shapes(source.structure)
    out = []
    for part in source.parts():
        layers = source.part_layers(part)
        packed = sum(m.nbytes for n in layers
                     for m in packed_metas(n, *shapes[n], source.plan.specs[n], n in source.biases).values())
        plain = sum(m.nbytes for m in source.part_plain_metas(part).values())
        sizes = [shapes[n][0] * shapes[n][1] for n in layers]
        out.append(StoredPart(part.index, packed + plain, sum(sizes), max(sizes, default=0)))
    return tuple(out)
