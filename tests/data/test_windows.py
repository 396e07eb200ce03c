"""Token windows: GPTQ convention, non-overlap, dropped tail, seeded calibration draws."""

import pytest
import torch

from mixbits.data.windows import calibration_windows, eval_windows, text_fingerprint, tokenize_joined
from tests.conftest import make_text, make_tokenizer


class CharTokenizer:
    """One token per character (its code point): makes window arithmetic easy to check."""

    def __call__(self, text, return_tensors=None, verbose=True):
        assert return_tensors == "pt"
        return type("Encoding", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()


DOCS = ["abcdefghij", "klmnopqrst", "uvwxyz"]  # joined: 10 + 2 + 10 + 2 + 6 = 30 characters


def test_joined_with_blank_line_and_tokenized_once():
    ids = tokenize_joined(CharTokenizer(), DOCS)
    assert "".join(map(chr, ids.tolist())) == "\n\n".join(DOCS)
    assert ids.dtype == torch.long and ids.dim() == 1


def test_eval_windows_are_consecutive_and_drop_the_tail():
    w = eval_windows(CharTokenizer(), DOCS, seqlen=8)
    joined = "\n\n".join(DOCS)
    assert w.shape == (3, 8)  # 30 // 8 windows; the last 6 characters are dropped
    assert ["".join(map(chr, row.tolist())) for row in w] == [joined[0:8], joined[8:16], joined[16:24]]


def test_eval_windows_keep_the_first_max_windows():
    full = eval_windows(CharTokenizer(), DOCS, seqlen=5)
    assert torch.equal(eval_windows(CharTokenizer(), DOCS, seqlen=5, max_windows=2), full[:2])
    assert torch.equal(eval_windows(CharTokenizer(), DOCS, seqlen=5, max_windows=100), full)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(CharTokenizer(), DOCS, seqlen=5, max_windows=0)


def test_too_short_text_names_token_count_and_fix():
    with pytest.raises(ValueError, match=r"only 30 tokens.*smaller --seqlen"):
        eval_windows(CharTokenizer(), DOCS, seqlen=31)
    with pytest.raises(ValueError, match=r"only 30 tokens"):
        calibration_windows(CharTokenizer(), DOCS, seqlen=64, n=2, seed=0)


def test_calibration_windows_are_slices_and_seeded():
    joined = torch.tensor([ord(c) for c in "\n\n".join(DOCS)])
    a = calibration_windows(CharTokenizer(), DOCS, seqlen=7, n=16, seed=3)
    b = calibration_windows(CharTokenizer(), DOCS, seqlen=7, n=16, seed=3)
    c = calibration_windows(CharTokenizer(), DOCS, seqlen=7, n=16, seed=4)
    assert a.shape == (16, 7) and torch.equal(a, b) and not torch.equal(a, c)
    for row in a:  # every window is a contiguous slice of the joined text
        starts = [s for s in range(len(joined) - 6) if torch.equal(joined[s:s + 7], row)]
        assert starts


def test_calibration_can_reach_the_last_window():
    w = calibration_windows(CharTokenizer(), DOCS, seqlen=30, n=3, seed=0)
    assert torch.equal(w, tokenize_joined(CharTokenizer(), DOCS).expand(3, 30))


def test_real_tokenizer_matches_gptq_call():
    text = make_text(n_docs=10)
    tok = make_tokenizer(text)
    docs = text.split("\n\n")
    expected = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    w = eval_windows(tok, docs, seqlen=16)
    assert torch.equal(w.reshape(-1), expected[: w.numel()])


def test_fingerprint_depends_on_values_and_shape():
    t = torch.arange(12)
    assert text_fingerprint(t.reshape(3, 4)) == text_fingerprint(t.reshape(3, 4).clone())
    assert text_fingerprint(t.reshape(3, 4)) != text_fingerprint(t.reshape(4, 3))
    assert text_fingerprint(t.reshape(3, 4)) != text_fingerprint((t + 1).reshape(3, 4))
    assert len(text_fingerprint(t)) == 64
