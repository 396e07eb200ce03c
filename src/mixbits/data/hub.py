"""WikiText-2 and C4 through the `datasets` library, for users who can reach the Hugging Face hub.

These are the texts of the quantization literature (GPTQ, AWQ, EfficientQAT), taken the way
GPTQ's `datautils.py` takes them, so perplexities compare with published numbers:

* `wikitext2`: `wikitext` / `wikitext-2-raw-v1`; calibration = train, validation = validation,
  test = test. Each row is one line of the corpus; joined with "\\n\\n" by the window code,
  exactly GPTQ's `"\\n\\n".join(data["text"])`.
* `c4`: `allenai/c4`, English. calibration = the first `C4_CALIBRATION_DOCS` documents of
  training shard 0 (GPTQ samples from all of that shard; the cap keeps tokenizing to seconds),
  test = the first 1100 documents of validation shard 0 (GPTQ's `c4` test set), validation =
  the 1100 documents after those. Unlike GPTQ (which joins C4 test documents with a space and
  keeps 256 windows) the window code joins with "\\n\\n" like every other text here.

`datasets` is imported lazily and is optional (`pip install 'mixbits[hub]'`).
"""

from __future__ import annotations

from mixbits.data.errors import MixbitsDataError
from mixbits.data.splits import check_split
from mixbits.errors import UserError

HUB_TEXTS = ("wikitext2", "c4")
C4_CALIBRATION_DOCS = 5000
C4_TEST_DOCS = 1100
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def _fix(name: str, why: str) -> MixbitsDataError:
    return MixbitsDataError(
        f"dataset {name!r} needs the Hugging Face hub: {why}. Fix: `pip install datasets` (or "
        f"`pip install 'mixbits[hub]'`) and make the hub reachable (HF_HUB_OFFLINE=0, network), "
        f"or use the embedded texts 'wiki' / 'canterbury', or a local .txt / .jsonl file"
    )


def load_hub_text(name: str, split: str) -> list[str]:
    """Documents of one split of `wikitext2` or `c4`, downloaded by `datasets` (cached by it)."""
    check_split(split)
    if name not in HUB_TEXTS:
        raise UserError(f"{name!r} is not a hub text; choose one of {HUB_TEXTS}")
    try:
        import datasets
    except ImportError as err:
        raise _fix(name, "the `datasets` package is not installed") from err
    try:
        if name == "wikitext2":
            hf_split = {"calibration": "train", "validation": "validation", "test": "test"}[split]
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return list(rows["text"])
        shard = "train" if split == "calibration" else "validation"
        rows = datasets.load_dataset("allenai/c4", data_files={shard: _C4_FILES[shard]}, split=shard)
    except (OSError, ValueError) as err:  # ConnectionError and the hub's not-found errors are OSErrors
        raise _fix(name, f"loading it failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if split == "calibration":
        return list(rows.select(range(min(C4_CALIBRATION_DOCS, len(rows))))["text"])
    start = 0 if split == "test" else C4_TEST_DOCS
    return list(rows.select(range(start, min(start + C4_TEST_DOCS, len(rows))))["text"])
