"""Our layer-by-layer forward equals the Hugging Face model (prefill and decode logits)."""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine.decode import decode_step
from tests.conftest import PASSAGES, config, tiny_model

ARCHS = ["llama", "qwen2", "llama3_rope", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_equal_hf(arch, make_engine):
    model = tiny_model(arch, seed=3)
    engine = make_engine(model=model)
    req = engine.prepare([" ".join(PASSAGES)], config=config("full_recompute"), extra_capacity=6)
    tokens = list(req.prompt_ids)
    assert len(tokens) > 60  # long enough for llama3 scaling (original context 32) to matter
    logits = req.logits
    for _ in range(5):
        with torch.no_grad():
            expected = model(torch.tensor([tokens])).logits[0, -1].float()
        assert_close(logits, expected, atol=2e-5, rtol=1e-4)
        tokens.append(int(logits.argmax()))
        with torch.inference_mode():
            logits = decode_step(engine.model_forward, req.cache, tokens[-1])


def test_qwen2_biases_are_used(make_engine):
    model = tiny_model("qwen2", seed=1)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    engine = make_engine(model=model)
    req = engine.prepare([PASSAGES[0]], config=config("full_recompute"))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.add_(1.0)
    changed = engine.prepare([PASSAGES[0]], config=config("full_recompute"))
    assert not torch.allclose(req.logits, changed.logits)


def test_llama3_rope_scaling_reaches_the_forward(make_engine):
    plain, scaled = tiny_model("llama", seed=3), tiny_model("llama3_rope", seed=3)
    a = make_engine(model=plain).prepare([" ".join(PASSAGES)], config=config("full_recompute")).logits
    b = make_engine(model=scaled).prepare([" ".join(PASSAGES)], config=config("full_recompute")).logits
    assert not torch.allclose(a, b, atol=1e-3)


def test_bf16_forward_close_to_hf(make_engine):
    model = tiny_model("llama", seed=5).to(torch.bfloat16)
    engine = make_engine(model=model)
    req = engine.prepare([PASSAGES[1]], config=config("full_recompute"))
    with torch.no_grad():
        expected = model(torch.tensor([req.prompt_ids])).logits[0, -1].float()
    assert_close(req.logits, expected, atol=0.05, rtol=0.05)
