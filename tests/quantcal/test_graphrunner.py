"""Fixed-shape decoding (the path CUDA graphs replay), run on CPU without capture: the
attention mask padded to the cache length and total_sequence_length pinned to it give the
same logits and tokens as the growing-shape runner, on all three families."""

from __future__ import annotations

import numpy as np
import pytest

from quantcal.graphrunner import GraphRunner, decoding_runner
from quantcal.greedy import greedy_model
from quantcal.runner import DecoderRunner
from quantcal.session import cpu_session_of, make_session

from tinymodels import export_unquantized


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_unquantized(tiny_model_dir, path).config.vocab_size


def test_fixed_shape_steps_match_growing_steps(decoder):
    path, vocab = decoder
    fixed = GraphRunner(*make_session(path, "cpu"), cuda_graph=False)
    plain = DecoderRunner(*make_session(path, "cpu"))
    ids = np.random.default_rng(5).integers(0, vocab, size=(2, 9))
    for _ in range(2):  # a second sequence of the same shape reuses the buffers
        got = [fixed.prefill(ids[:, :3], cache_length=8)[:, -1]]
        ref = [plain.prefill(ids[:, :3])[:, -1]]
        for t in range(3, 8):
            got.append(fixed.decode_step(ids[:, t:t + 1])[:, 0])
            ref.append(plain.decode_step(ids[:, t:t + 1])[:, 0])
        np.testing.assert_allclose(np.stack(got), np.stack(ref), rtol=1e-5, atol=1e-5)
    assert len(fixed._slots) == 1
    with pytest.raises(RuntimeError, match="cache is full"):
        fixed.decode_step(ids[:, 8:9])
    with pytest.raises(ValueError, match="cache_length"):
        fixed.prefill(ids)


def test_fixed_shape_generation_equals_plain_generation(decoder):
    path, _ = decoder
    fixed = GraphRunner(*make_session(path, "cpu"), cuda_graph=False)
    plain = DecoderRunner(*make_session(path, "cpu"))
    for prompt in ([3, 1, 4, 1, 5], [2, 7], [3, 1, 4, 1, 5]):
        assert fixed.generate(prompt, 9) == plain.generate(prompt, 9)
    device = fixed.prefill(np.array([[1, 2, 3]]), host_logits=False, cache_length=6)
    step = fixed.decode_step(fixed.next_tokens(device), host_logits=False)
    assert step.shape()[:2] == [1, 1]


def test_buffers_are_kept_for_a_bounded_number_of_shapes(decoder, monkeypatch):
    import quantcal.graphrunner as graphrunner

    monkeypatch.setattr(graphrunner, "MAX_SLOTS", 2)
    fixed = GraphRunner(*make_session(decoder[0], "cpu"), cuda_graph=False)
    plain = DecoderRunner(*make_session(decoder[0], "cpu"))
    for length in (6, 7, 8, 6):
        assert fixed.generate([1, 2, 3], length - 3) == plain.generate([1, 2, 3], length - 3)
    assert list(fixed._slots) == [(1, 8), (1, 6)]


def _device_greedy(path) -> GraphRunner:
    runner = GraphRunner(cpu_session_of(greedy_model(path), path.parent), "cpu",
                         cuda_graph=False)
    assert runner.device_greedy
    return runner


def test_device_greedy_steps_give_the_plain_runners_tokens(decoder):
    """The greedy model's own next ids, positions and mask, fed crosswise from step to step,
    pick what the plain runner picks from its logits on the host (batch of 2, twice over the
    same buffers, then a general decode step after it)."""
    path, vocab = decoder
    fixed, plain = _device_greedy(path), DecoderRunner(*make_session(path, "cpu"))
    prompt = np.random.default_rng(7).integers(0, vocab, size=(2, 4))
    for _ in range(2):
        got = list(fixed.greedy(fixed.prefill(prompt, cache_length=12), 7))
        ref, logits = [], plain.prefill(prompt)
        for _ in range(7):
            ref.append(logits[:, -1].argmax(-1).reshape(-1, 1))
            logits = plain.decode_step(ref[-1])
        np.testing.assert_array_equal(np.hstack(got), np.hstack(ref))
    assert fixed.past_length == 4 + 6
    np.testing.assert_allclose(fixed.decode_step(got[-1])[:, 0], logits[:, 0], atol=1e-5)
    with pytest.raises(RuntimeError, match="cache is full"):
        list(fixed.greedy(fixed.prefill(prompt, cache_length=6), 4))


def test_device_greedy_generation_equals_plain_generation(decoder):
    path, _ = decoder
    fixed, plain = _device_greedy(path), DecoderRunner(*make_session(path, "cpu"))
    for prompt, new in (([3, 1, 4, 1, 5], 9), ([2, 7], 1), ([2, 7, 1], 12)):
        assert fixed.generate(prompt, new) == plain.generate(prompt, new)
    stop = fixed.generate([3, 1, 4], 9, stop=lambda t: len(t) == 3)
    assert stop == plain.generate([3, 1, 4], 9)[:3]
    padded, mask = np.array([[5, 6, 7], [8, 9, 0]]), np.array([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="without padding"):
        fixed.prefill(padded, mask, cache_length=8)


def test_decoding_runner_on_cpu_is_the_plain_runner(decoder):
    runner = decoding_runner(decoder[0], "cpu")
    assert type(runner) is DecoderRunner and runner.provider == "cpu"


@pytest.mark.gpu
def test_cuda_graph_decoding_matches_plain_decoding_on_cuda(tiny_model_dir, tmp_path):
    """The whole fp16 graph on the CUDA provider (CPU fallback disabled), and decode steps
    replayed from a captured CUDA graph equal the plain runner's, token for token."""
    path = tmp_path / "model.onnx"
    model = export_unquantized(tiny_model_dir, path, np.float16)
    plain = DecoderRunner(*make_session(path, "cuda"))
    graph = decoding_runner(path, "cuda")
    assert plain.provider == "cuda" and isinstance(graph, GraphRunner) and graph.cuda_graph
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, size=(2, 12))
    for _ in range(2):  # the second sequence replays the graph captured by the first
        ref = [plain.prefill(ids[:, :4])[:, -1]]
        got = [graph.prefill(ids[:, :4], cache_length=12)[:, -1]]
        for t in range(4, 12):
            ref.append(plain.decode_step(ids[:, t:t + 1])[:, 0])
            got.append(graph.decode_step(ids[:, t:t + 1])[:, 0])
        np.testing.assert_allclose(np.stack(got, dtype=np.float32),
                                   np.stack(ref, dtype=np.float32), atol=2e-3)
    assert graph.generate([3, 1, 4, 1, 5], 16) == plain.generate([3, 1, 4, 1, 5], 16)
    assert graph.device_greedy  # the steps of generate() replayed the greedy model
    for _ in range(2):  # batch 2 on the crosswise buffers, captured then replayed
        got = np.hstack(list(graph.greedy(graph.prefill(ids[:, :4], cache_length=20), 9)))
        ref = np.hstack(list(plain.greedy(plain.prefill(ids[:, :4]), 9)))
        np.testing.assert_array_equal(got, ref)
