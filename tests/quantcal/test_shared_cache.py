"""The runner's in-place cache on real exported decoders (GroupQueryAttention) of the three
families: past and present bound to one preallocated buffer give the same logits as a cache
that grows by one position per step."""

from __future__ import annotations

import numpy as np
import pytest

from quantcal.runner import DecoderRunner
from quantcal.session import make_session

from tinymodels import export_unquantized


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_unquantized(tiny_model_dir, path).config.vocab_size


def test_shared_cache_is_written_in_place_and_matches(decoder):
    path, vocab = decoder
    runner, reference = (DecoderRunner(*make_session(path, "cpu")) for _ in range(2))
    assert runner.shares_cache
    ids = np.random.default_rng(3).integers(0, vocab, size=(2, 8))
    ref = [reference.prefill(ids[:, :3])[:, -1]]
    got = [runner.prefill(ids[:, :3], cache_length=6)[:, -1]]
    for t in range(3, 6):
        ref.append(reference.decode_step(ids[:, t:t + 1])[:, 0])
        got.append(runner.decode_step(ids[:, t:t + 1])[:, 0])
        assert runner.past_length == t + 1
        assert set(runner.cache_lengths()) == {6}  # never reallocated
    np.testing.assert_allclose(np.stack(got), np.stack(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cache is full"):
        runner.decode_step(ids[:, 6:7])
    with pytest.raises(ValueError, match="shorter than the prompt"):
        runner.prefill(ids, cache_length=4)


def test_generation_with_the_shared_cache_equals_recomputation(decoder):
    path, vocab = decoder
    runner = DecoderRunner(*make_session(path, "cpu"))
    prompt = [3, 1, 4, 1, 5]
    tokens = runner.generate(prompt, max_new_tokens=10)
    assert runner.past_length == len(prompt) + 9
    expected: list[int] = []
    for _ in range(10):
        logits = runner.prefill(np.array([prompt + expected]))
        expected.append(int(logits[0, -1].argmax()))
    assert tokens == expected
