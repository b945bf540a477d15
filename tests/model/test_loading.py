"""Model resolution: aliases, GGUF conversion cache, folders, clear errors."""

import json

import pytest
import torch

from cacheblend_rag import CacheBlendEngine, ModelNotFoundError, UnsupportedModelError
from cacheblend_rag.model.loading import resolve_dtype, resolve_model_dir


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"GGUF file not found"):
        CacheBlendEngine.from_pretrained(tmp_path / "nope.gguf", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="no model file or folder"):
        CacheBlendEngine.from_pretrained(str(tmp_path / "missing-dir") + "/", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"without config\.json"):
        CacheBlendEngine.from_pretrained(tmp_path / "empty", cache_dir=tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        CacheBlendEngine.from_pretrained("some-org/not-a-model", cache_dir=tmp_path)


def test_unsupported_architecture_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture .gpt2.*supported: llama"):
        CacheBlendEngine.from_pretrained(folder, cache_dir=tmp_path)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        CacheBlendEngine(model, None)


def test_dynamic_rope_rejected(tmp_path):
    from transformers import LlamaConfig

    from cacheblend_rag.model.forward import check_supported

    cfg = LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        check_supported(cfg)


def test_dtype_choice():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.real_model
def test_alias_conversion_is_cached(smollm2_dir, monkeypatch):
    import transformers

    from cacheblend_rag.model.loading import default_cache_dir

    assert (smollm2_dir / "model.safetensors").is_file()
    assert json.loads((smollm2_dir / "cacheblend_source.json").read_text())["architecture"] == "llama"

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    assert resolve_model_dir("smollm2-135m", default_cache_dir()) == str(smollm2_dir)
    assert not list(smollm2_dir.parent.glob(".convert-*"))
