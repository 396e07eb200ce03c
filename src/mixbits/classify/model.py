"""Model plumbing of the classifier flow: which head a model gets, the encoder + head module, and
how dataset labels map onto a checkpoint's own classes.

`EncoderClassifier` keeps the encoder under its `base_model_prefix` (`bert`, `distilbert`,
`roberta`), exactly where a Hugging Face `*ForSequenceClassification` model keeps it, so the
architecture table finds the same blocks and linears (`bert.encoder.layer.3.attention.self.query`)
and a plan, `fake_quantize_model` and the ablations apply to it unchanged. The head is an
`nn.Linear` outside the blocks, so it stays in full precision like any classifier head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from mixbits.classify.config import HEADS
from mixbits.classify.head import HeadFit, sentence_embedding
from mixbits.model.load import embedded_model, model_architectures

log = logging.getLogger(__name__)



class EncoderClassifier(nn.Module):
    """logits = head(sentence_embedding(encoder(...).last_hidden_state, attention_mask))."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.prefix = encoder.base_model_prefix
        setattr(self, self.prefix, encoder)  # registered as a submodule under the HF name
        self.config = encoder.config
        self.head = head

    @classmethod
    def from_fit(cls, encoder: nn.Module, fit: HeadFit) -> "EncoderClassifier":
        head = nn.Linear(fit.weight.shape[1], fit.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(fit.weight)
            head.bias.copy_(fit.bias)
        device = next(encoder.parameters()).device
        return cls(encoder, head.to(device)).eval()

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return SequenceClassifierOutput(logits=self.head(sentence_embedding(hidden, attention_mask)))


@torch.no_grad()
def embeddings_of(encoder: nn.Module, inputs: Mapping[str, torch.Tensor], *, device: torch.device,
                  batch_size: int = 32) -> torch.Tensor:
    """[N, H] float32 sentence embeddings (CPU) of tokenized texts [N, L], in batches."""
    n = len(inputs["input_ids"])
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
        hidden = encoder(**batch).last_hidden_state
        out.append(sentence_embedding(hidden.float(), batch["attention_mask"]).cpu())
    return torch.cat(out)


def choose_task(model: str, head: str) -> str:
    """The `load_model` task: "sequence-classification" (use the checkpoint's head) or "encoder"
    (train one). Reads only the config; embedded models answer from their table entry."""
    if head not in HEADS:
        raise ValueError(f"--head {head!r}; use one of {HEADS}")
    entry = embedded_model(model)
    if entry is not None:
        has_head = entry.task == "sequence-classification"
        if entry.task == "causal-lm":
            raise ValueError(f"embedded model {model!r} is a causal LM; `mixbits classify` needs an encoder "
                             f"(e.g. minilm-l6) or a sequence classifier; use `mixbits run` for causal LMs")
    else:
        has_head = any(a.endswith("ForSequenceClassification") for a in model_architectures(model))
    if head == "model" and not has_head:
        raise ValueError(f"model {model!r} has no sequence-classification head; use --head train (or auto)")
    return "sequence-classification" if head == "model" or (head == "auto" and has_head) else "encoder"


def label_mapping(id2label: Mapping[int, str] | None, num_labels: int, label_names: Sequence[str]) -> tuple[int, ...]:
    """Model class index of each dataset class, matched by name (case-insensitive) where the
    checkpoint's labels name the dataset's; otherwise the identity, which needs equal counts."""
    names = [n.lower() for n in label_names]
    model_names = {str(v).lower(): int(k) for k, v in (id2label or {}).items()}
    if set(names) <= set(model_names):
        return tuple(model_names[n] for n in names)
    if num_labels != len(names):
        raise ValueError(f"the model has {num_labels} classes {sorted(model_names)} and the dataset {len(names)} "
                         f"{list(label_names)}; use a dataset with the model's classes, or --head train")
    log.warning("model labels %s do not name the dataset's %s; taking class i of the dataset as class i of the model",
                sorted(model_names), list(label_names))
    return tuple(range(len(names)))
