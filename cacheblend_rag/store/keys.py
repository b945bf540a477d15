"""Content-addressed keys for KV blocks.

A block's key chains the model fingerprint, the key of everything before it, and its own token ids
(as nano-vllm hashes prefix blocks). A chunk precomputed alone is the block that follows the chunk prefix,
so its key is ``chain_key(fp, chain_key(fp, None, prefix_ids), chunk_ids)``; an exact prompt prefix is
a chain of such blocks. Different models, tokenizers, prefixes or tokens give different keys.

A registry scope (one per API key on a server, say) salts every key of its blocks, as vLLM's ``cache_salt``
does: the chain starts at ``scope_root(scope)`` instead of at the root, so two scopes never share an entry and one
cannot learn from the store (hits, what is already stored, timing) what another one holds. The default scope
(None) is the unsalted chain: its keys are those of an engine without scopes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch


def chain_key(model_fingerprint: str, parent: str | None, token_ids: Sequence[int]) -> str:
    """sha256 hex of (model fingerprint, parent key, token ids)."""
    h = hashlib.sha256()
    h.update(b"cacheblend-kv-v1\0")
    h.update(model_fingerprint.encode())
    h.update(b"\0" + (parent or "root").encode() + b"\0")
    h.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


MAX_SCOPE_CHARS = 256


def check_scope(scope: object) -> str | None:
    """``scope`` if it is None (the default scope) or a non-empty str of at most MAX_SCOPE_CHARS characters."""
    if scope is None:
        return None
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_CHARS:
        raise ValueError(
            f"scope must be None (the default scope) or a non-empty str of at most {MAX_SCOPE_CHARS} characters, "
            f"got {type(scope).__name__} {str(scope)[:40]!r}"
        )
    return scope


def scope_salt(scope: str | None) -> str | None:
    """A scope's salt: sha256 hex of its name (None for the default scope). Names never appear in keys."""
    if check_scope(scope) is None:
        return None
    return hashlib.sha256(b"cacheblend-scope-v1\0" + scope.encode("utf-8", "surrogatepass")).hexdigest()


def scope_root(scope: str | None) -> str | None:
    """The parent the key chains of ``scope`` start from (None: the root, the default scope's unsalted chain)."""
    salt = scope_salt(scope)
    return None if salt is None else f"scope:{salt}"


def _bits_sums(flat: torch.Tensor) -> tuple[int, int]:
    """Exact integer sums of a tensor's bit patterns: plain, and weighted by position mod 251 (a swap shows).

    flat: [N] contiguous. Integer addition is associative, so the result is the same on every device and
    for every thread count (float sums are not: their rounding follows the parallel reduction order).
    """
    size = flat.element_size()
    bits = flat.view(torch.int32 if size % 4 == 0 else torch.int16 if size == 2 else torch.uint8)
    whole = bits.numel() // 251 * 251
    cols = [0] * 251  # cols[j]: sum of the elements at positions = j mod 251
    if whole:
        cols = bits[:whole].view(-1, 251).sum(dim=0, dtype=torch.int64).tolist()
    for j, value in enumerate(bits[whole:].tolist()):
        cols[j] += value
    return sum(cols), sum((j + 1) * c for j, c in enumerate(cols))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Digest of every parameter's name, shape, dtype, exact sums of its bits and a strided sample.

    Any retrained or fine-tuned weight changes a sum (and the sample); hashing every byte of a large model
    would cost seconds per load. The digest does not depend on the device or the number of threads, so
    every process and machine running the same model shares one key space.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().contiguous().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{_bits_sums(flat)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of the tokenizer's full definition (fast tokenizers) or its vocabulary and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "all_special_tokens", []), sort_keys=True).encode())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, tokenizer, *, extra: str = "") -> str:
    """Identity of (architecture config, weights, tokenizer, compute dtype): the namespace of every key."""
    config = model.config.to_dict()
    for volatile in (
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "_attn_implementation_autoset",
        "_attn_implementation",
        "use_cache",
        "dtype",
        "torch_dtype",
    ):
        config.pop(volatile, None)
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(weights_fingerprint(model).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(extra.encode())
    return h.hexdigest()
