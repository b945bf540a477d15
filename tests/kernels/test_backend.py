"""Backend choice on a machine without CUDA: "auto" never tries Triton, forcing it is a clear error."""

from __future__ import annotations

import pytest
import torch

from cacheblend_rag.kernels import attention, backend, deviation, rotary
from cacheblend_rag.kernels.backend import HAVE_TRITON, resolve_backend

CPU = torch.device("cpu")


def _forbid_triton(monkeypatch) -> None:
    """Make every Triton launcher raise, so a wrapper that reaches one fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a Triton launcher was called")

    for module, name in (
        (rotary, "apply_rope_triton"),
        (deviation, "kv_deviation_triton"),
        (attention, "selected_attention_triton"),
    ):
        monkeypatch.setattr(module, name, boom, raising=False)


def _run_every_wrapper(backend_name: str) -> None:
    rope = rotary.RopeTable(torch.ones(8))
    x = torch.randn(2, 5, 16)
    positions = torch.arange(3, 8)
    rotary.apply_rope(x, positions, rope, backend=backend_name)
    deviation.kv_deviation(x, x, torch.ones(5, dtype=torch.bool), backend=backend_name)
    attention.selected_attention(x, positions - 3, x, x, 0.25, backend=backend_name)


@pytest.mark.parametrize("interpret", ["", "1"])
def test_auto_never_picks_triton_on_cpu(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert resolve_backend("auto", CPU) == "torch"
    _forbid_triton(monkeypatch)
    _run_every_wrapper("auto")
    _run_every_wrapper("torch")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_auto_picks_triton_for_cuda_tensors():
    # resolve_backend only looks at the device type, so this runs without a GPU
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"


def test_forcing_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _forbid_triton(monkeypatch)
    expected = "TRITON_INTERPRET=1" if HAVE_TRITON else "pip install triton"
    with pytest.raises(RuntimeError, match=expected):
        resolve_backend("triton", CPU)
    with pytest.raises(RuntimeError, match=expected):
        _run_every_wrapper("triton")


def test_forcing_triton_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setattr(backend, "HAVE_TRITON", False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        resolve_backend("triton", torch.device("cuda", 0))
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"auto, torch, triton; got 'cuda'"):
        resolve_backend("cuda", CPU)


def test_engine_with_triton_forced_on_cpu_fails_before_any_work(make_engine, monkeypatch):
    from cacheblend_rag import BlendConfig

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    engine = make_engine("llama", seed=1)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        engine.prepare(["Hello there."], config=BlendConfig(backend="triton"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: rotary.apply_rope(torch.randn(2, 5), torch.arange(5), rotary.RopeTable(torch.ones(8))),
            r"x must be \[heads, tokens, head_dim\], got shape \(2, 5\)",
        ),
        (
            lambda: rotary.apply_rope(torch.randn(2, 5, 16), torch.arange(-1, 4), rotary.RopeTable(torch.ones(8))),
            "positions must be >= 0, got a minimum of -1",
        ),
        (
            lambda: rotary.apply_rope(
                torch.randn(2, 5, 16),
                torch.arange(5),
                rotary.RopeTable(torch.ones(8)),
                out=torch.empty(2, 5, 16, dtype=torch.float16),
            ),
            "out must match x",
        ),
        (
            lambda: deviation.kv_deviation(torch.randn(2, 5, 16), torch.randn(2, 6, 16), torch.ones(5, dtype=bool)),
            "pass rows=",
        ),
        (
            lambda: deviation.kv_deviation(
                torch.randn(2, 3, 16), torch.randn(2, 6, 16), torch.ones(3, dtype=bool), rows=torch.tensor([0, 2, 6])
            ),
            r"rows must lie in \[0, 6\), got \[0, 6\]",
        ),
        (
            lambda: attention.selected_attention(
                torch.randn(3, 2, 16), torch.tensor([0, 1]), torch.randn(2, 4, 16), torch.randn(2, 4, 16), 0.25
            ),
            "query heads 3 not a multiple of KV heads 2",
        ),
        (
            lambda: attention.selected_attention(
                torch.randn(2, 2, 16), torch.tensor([0, 4]), torch.randn(2, 4, 16), torch.randn(2, 4, 16), 0.25
            ),
            r"q_pos must lie in \[0, 4\)",
        ),
    ],
)
def test_wrappers_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_request_resolves_auto_once_and_every_kernel_gets_the_resolved_name(make_engine, monkeypatch):
    from cacheblend_rag import BlendConfig
    from cacheblend_rag.kernels import dispatch
    from tests.conftest import PASSAGES

    engine = make_engine("llama", seed=1)
    handles = engine.precompute(PASSAGES[:2])
    choices, kernel_calls = [], []

    def choose(name, device):
        choices.append(name)
        return resolve_backend(name, device)

    def kernel_check(name, device):
        kernel_calls.append(name)
        return resolve_backend(name, device)

    monkeypatch.setattr(dispatch, "resolve_backend", choose)
    for module in (attention, deviation, rotary):
        monkeypatch.setattr(module, "resolve_backend", kernel_check)
    engine.generate(["Q: ", *handles, " A:"], max_new_tokens=3, config=BlendConfig(strategy="cacheblend"))
    assert choices == ["auto"]  # chosen once for the request (prefill and decoding)
    assert kernel_calls and set(kernel_calls) == {"torch"}  # the kernels are handed the choice, never "auto"
