"""Decoding through a CUDA graph (engine/decode.py: Decoder) gives what eager decoding gives.

CUDA only: graph capture needs a GPU. On the CPU the Decoder always decodes eagerly (checked here too).
"""

import pytest
import torch

from tests.conftest import PASSAGES

CUDA = torch.cuda.is_available()
SEGMENTS_TAIL = "\nSay something about the rivers."


def test_on_the_cpu_the_decoder_never_captures(make_engine):
    engine = make_engine("llama", seed=11)
    result = engine.generate(["Read.\n", *engine.precompute(PASSAGES), SEGMENTS_TAIL], max_new_tokens=16)
    assert engine.cuda_graphs and result.stats.graph_steps == 0


def _cuda_engine(make_engine, graphs: bool):
    from tests.conftest import tiny_model

    model = tiny_model("llama", seed=11).to("cuda")
    return make_engine("llama", model=model, cuda_graphs=graphs)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: CUDA graphs")
def test_graph_decoding_equals_eager_decoding(make_engine):
    graph, eager = _cuda_engine(make_engine, True), _cuda_engine(make_engine, False)
    outs = []
    for engine in (graph, eager):
        segments = ["Read.\n", *engine.precompute(PASSAGES), SEGMENTS_TAIL]
        outs.append(engine.generate(segments, max_new_tokens=24))
    assert graph.cuda_graphs, "capture failed (see the log)"
    assert outs[0].stats.graph_steps > 0 and outs[1].stats.graph_steps == 0
    assert outs[0].token_ids == outs[1].token_ids


@pytest.mark.skipif(not CUDA, reason="needs CUDA: CUDA graphs")
def test_a_captured_graph_survives_the_rope_table_growing(make_engine):
    """A graph reads the shared RoPE cos/sin table at every replay; another request that grows the table (a longer
    prompt, decoded in between) must not free the tensors the graph was captured with."""
    graph, eager = _cuda_engine(make_engine, True), _cuda_engine(make_engine, False)
    results = []
    for engine in (graph, eager):
        segments = ["Read.\n", *engine.precompute(PASSAGES), SEGMENTS_TAIL]
        stream = engine.stream(segments, max_new_tokens=24)
        pieces = [next(stream) for _ in range(3)]  # the graph is captured by now
        fwd = engine.model_forward
        fwd.rope.tables(1 << 17, fwd.dtype, torch.device("cuda", torch.cuda.current_device()))  # grown: replaced
        torch.cuda.empty_cache()
        junk = torch.full((1 << 24,), float("nan"), device="cuda")  # reuses freed memory if any was freed
        pieces += list(stream)
        del junk
        results.append((stream.result.token_ids, "".join(pieces)))
    assert results[0] == results[1]
