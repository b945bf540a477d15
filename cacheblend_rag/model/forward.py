"""Layer-by-layer forward over a Hugging Face decoder, reading its modules' weights (nothing copied).

Each step works on any subset of rows: ``qkv`` projects the rows of one layer (queries rotated to their
absolute positions, keys returned *before* RoPE so they can be stored and re-rotated), ``finish_layer``
applies the output projection, residuals and MLP to the same rows. The blended prefill and the decoder
drive these steps; attention over the fused cache happens in between (``attend``: kernels/attention.py).

A forward carries the kernels it calls (``kernels``, chosen once: ``with_backend`` gives a copy on another
backend for one request, ``within`` one that trusts the positions it is given to lie below a bound), so no step
takes a backend name or a bound.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..kernels import Kernels
from ..kernels.rotary import RopeTable

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model's architecture or a feature of it is not supported by the blending engine."""


def rope_parameters(config) -> dict:
    """The RoPE settings of a transformers config (v5 ``rope_parameters`` or v4 ``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def check_supported(config) -> None:
    """Raise UnsupportedModelError naming the architecture unless the engine can run it exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = getattr(config, "architectures", None) or [model_type]
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModelError(
            f"unsupported architecture {archs[0]!r} (model_type={model_type!r}); supported: {supported}"
        )
    rope_type = rope_parameters(config).get("rope_type", rope_parameters(config).get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} changes frequencies with the sequence length, so cached keys cannot be "
            f"re-rotated exactly; supported RoPE types: {', '.join(STATIC_ROPE_TYPES)}"
        )


def sliding_window(config) -> int | None:
    """The attention window of the model, if any layer uses one."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


class ModelForward:
    """Row-subset forward steps of a Llama / Mistral / Qwen2 ``*ForCausalLM``, on the kernels of ``backend``."""

    def __init__(self, model: nn.Module, backend: str = "auto") -> None:
        config = model.config
        check_supported(config)
        base = model.model
        self.model = model
        self.config = config
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.sliding_window = sliding_window(config)
        rotary = base.rotary_emb
        self.rope = RopeTable(rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0))
        self.kernels = Kernels.on(backend, self.device)

    def with_backend(self, backend: str) -> ModelForward:
        """This forward on the kernels of ``backend`` (itself if they are the ones it has): resolved here, once."""
        return self.with_kernels(Kernels.on(backend, self.device))

    def within(self, positions: int) -> ModelForward:
        """This forward for position and row tensors whose values all lie in [0, positions): the caller builds them
        on the host, so its kernels read none back (``Kernels.bound``). Each driver of the model binds once."""
        return self.with_kernels(self.kernels.within(positions))

    def with_kernels(self, kernels: Kernels) -> ModelForward:
        """This forward calling ``kernels`` (itself if they are the ones it has)."""
        if kernels == self.kernels:
            return self
        other = copy.copy(self)  # the modules are shared, not copied
        other.kernels = kernels
        return other

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [M] -> hidden: [M, hidden]."""
        return self.embed_tokens(ids)

    def attn_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h: [M, hidden] -> the normalised attention input [M, hidden]."""
        return self.layers[layer].input_layernorm(h)

    def project_kv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [M, hidden] normalised -> k: [Hkv, M, D] before RoPE, v: [Hkv, M, D]."""
        attn = self.layers[layer].self_attn
        m = x.shape[0]
        k = attn.k_proj(x).view(m, self.n_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(m, self.n_kv_heads, self.head_dim).transpose(0, 1)
        return k, v

    def project_q(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [M, hidden] normalised; positions: [M] -> q: [Hq, M, D] rotated to its positions."""
        m = x.shape[0]
        q = self.layers[layer].self_attn.q_proj(x).view(m, self.n_heads, self.head_dim).transpose(0, 1)
        return self.rotate(q, positions)

    def qkv(
        self, layer: int, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [M, hidden]; positions: [M] -> q: [Hq, M, D] rotated, k: [Hkv, M, D] before RoPE, v: [Hkv, M, D]."""
        x = self.attn_input(layer, h)
        k, v = self.project_kv(layer, x)
        return self.project_q(layer, x, positions), k, v

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [H, T, D] before RoPE; positions: [T] (within ``kernels.bound`` when it is set: nothing is read back)
        -> x rotated to its positions (into ``out`` if given)."""
        return self.kernels.rope(x, positions, self.rope, out=out)

    def attend(self, q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q: [Hq, M, D] rotated at q_pos: [M]; keys, values: [Hkv, N, D] (key j at position j) -> [Hq, M, D],
        each query attending to the keys at its position and before."""
        return self.kernels.attention(q, q_pos, keys, values, self.scale)

    def finish_layer(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: [M, hidden] (the layer's input rows); attn_out: [Hq, M, D] -> the layer's output rows [M, hidden]."""
        block = self.layers[layer]
        m = h.shape[0]
        h = h + block.self_attn.o_proj(attn_out.transpose(0, 1).reshape(m, self.n_heads * self.head_dim))
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [M, hidden] last-layer rows -> logits: [M, vocab] in float32."""
        return self.lm_head(self.norm(h)).float()
