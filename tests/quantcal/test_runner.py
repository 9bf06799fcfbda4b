"""DecoderRunner and make_session on a tiny synthetic decoder that honours the export contract.

The synthetic model appends each step's embeddings to the cache (present = Concat(past, new))
and lets the logits depend on the current tokens and on a position-weighted, mask-weighted
sum over the whole present cache, so a missing, duplicated, reordered or stale cache entry, a
wrong attention mask or wrong position ids all change the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from quantcal.errors import QuantcalError
from quantcal.export.builder import GraphBuilder, save_model
from quantcal.runner import DecoderRunner, read_spec
from quantcal.session import make_session

LAYERS, KV_HEADS, HEAD_DIM, VOCAB, MAX_POS = 2, 2, 4, 16, 64
HIDDEN = KV_HEADS * HEAD_DIM


def _embed(b: GraphBuilder, rng: np.random.Generator) -> str:
    """(B, S, HIDDEN) from token and position embeddings."""
    tok = b.initializer("embed_tokens", rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32))
    pos = b.initializer("embed_positions",
                        rng.normal(size=(MAX_POS, HIDDEN)).astype(np.float32))
    (t,) = b.node("Gather", [tok, "input_ids"], 1, name="/embed/tokens")
    (p,) = b.node("Gather", [pos, "position_ids"], 1, name="/embed/positions")
    return b.node("Add", [t, p], 1, name="/embed/add")[0]


def _layer(b: GraphBuilder, i: int, heads: str, rng: np.random.Generator) -> str:
    """Writes present.{i}.*; returns this layer's (B, P+S) per-position cache sum."""
    sums = []
    for kind in ("key", "value"):
        scale = b.initializer(f"l{i}.{kind}.scale",
                              rng.uniform(0.2, 1.0, size=(HEAD_DIM,)).astype(np.float32))
        (new,) = b.node("Mul", [heads, scale], 1, name=f"/layers.{i}/{kind}/scale")
        present = f"present.{i}.{kind}"
        b.node("Concat", [f"past_key_values.{i}.{kind}", new], [present],
               name=f"/layers.{i}/{kind}/concat", axis=2)
        b.output(present, b.elem_type, ["B", KV_HEADS, "total", HEAD_DIM])
        sums += b.node("ReduceSum", [present, "axes_1_3"], 1,
                       name=f"/layers.{i}/{kind}/sum", keepdims=0)
    return b.node("Add", sums, 1, name=f"/layers.{i}/sum")[0]


def build_decoder(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    b = GraphBuilder(np.float32)
    b.input("input_ids", TensorProto.INT64, ["B", "S"])
    b.input("attention_mask", TensorProto.INT64, ["B", "total"])
    b.input("position_ids", TensorProto.INT64, ["B", "S"])
    for i in range(LAYERS):
        for kind in ("key", "value"):
            b.input(f"past_key_values.{i}.{kind}", b.elem_type,
                    ["B", KV_HEADS, "past", HEAD_DIM])
    x = _embed(b, rng)
    b.const("heads_shape", [0, 0, KV_HEADS, HEAD_DIM])
    b.const("axes_1_3", [1, 3])
    b.const("axes_1", [1])
    (split,) = b.node("Reshape", [x, "heads_shape"], 1, name="/heads/reshape")
    (heads,) = b.node("Transpose", [split], 1, name="/heads/transpose", perm=[0, 2, 1, 3])
    per_position = [_layer(b, i, heads, rng) for i in range(LAYERS)]
    (total,) = b.node("Sum", per_position, 1, name="/cache/sum")  # (B, P+S)
    (mask,) = b.node("Cast", ["attention_mask"], 1, name="/cache/mask", to=TensorProto.FLOAT)
    (ramp,) = b.node("CumSum", [mask, b.const("axis_1", 1)], 1, name="/cache/ramp")
    (weighted,) = b.node("Mul", [total, mask], 1, name="/cache/masked")
    (weighted,) = b.node("Mul", [weighted, ramp], 1, name="/cache/ordered")
    (summary,) = b.node("ReduceSum", [weighted, "axes_1"], 1, name="/cache/reduce",
                        keepdims=1)  # (B, 1)
    (summary,) = b.node("Sin", [summary], 1, name="/cache/sin")
    (summary,) = b.node("Unsqueeze", [summary, "axes_1"], 1, name="/cache/unsqueeze")
    head = b.initializer("lm_head", rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32))
    mix = b.initializer("cache_mix", 3 * rng.normal(size=(VOCAB,)).astype(np.float32))
    (local,) = b.node("MatMul", [x, head], 1, name="/lm_head")
    (cache,) = b.node("Mul", [summary, mix], 1, name="/cache/mix")
    b.node("Add", [local, cache], ["logits"], name="/logits")
    b.output("logits", b.elem_type, ["B", "S", VOCAB])
    save_model(b.model(), path)
    return path


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory) -> Path:
    return build_decoder(tmp_path_factory.mktemp("decoder") / "model.onnx")


@pytest.fixture()
def runner(decoder_path) -> DecoderRunner:
    return DecoderRunner(*make_session(decoder_path, "cpu"))


def test_spec_is_read_from_the_session(runner):
    spec = runner.spec
    assert (spec.num_layers, spec.kv_heads, spec.head_dim) == (LAYERS, KV_HEADS, HEAD_DIM)
    assert spec.dtype == np.float32 and spec.vocab_size == VOCAB
    assert runner.provider == "cpu" and runner.past_length == 0


def test_decode_steps_match_full_prefill(decoder_path, runner):
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 9))
    reference = DecoderRunner(*make_session(decoder_path, "cpu"))
    logits = runner.prefill(ids[:, :3])
    assert logits.shape == (2, 3, VOCAB)
    assert runner.cache_lengths() == [3] * 2 * LAYERS
    for t in range(3, ids.shape[1]):
        step = runner.decode_step(ids[:, t:t + 1])
        assert step.shape == (2, 1, VOCAB)
        assert runner.cache_lengths() == [t + 1] * 2 * LAYERS
        full = reference.prefill(ids[:, :t + 1])
        np.testing.assert_allclose(step[:, 0], full[:, -1], rtol=1e-4, atol=1e-4)


def test_the_cache_matters(runner):
    """Guards the test model itself: a stale or missing cache changes the logits."""
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(1, 6))
    full = runner.prefill(ids)[:, -1]
    runner.prefill(ids[:, :4])
    stale = runner.decode_step(ids[:, 5:6])[:, 0]  # skips token 4
    alone = runner.prefill(ids[:, 5:6])[:, 0]
    assert not np.allclose(full, stale, atol=1e-3)
    assert not np.allclose(full, alone, atol=1e-3)


def _greedy_without_cache(runner: DecoderRunner, prompt: list[int], steps: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(steps):
        logits = runner.prefill(np.array([prompt + tokens]))
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens


def test_generate_is_greedy_and_deterministic(runner):
    prompt = [3, 1, 4, 1, 5]
    tokens = runner.generate(prompt, max_new_tokens=12)
    assert len(tokens) == 12
    assert runner.generate(np.array(prompt), max_new_tokens=12) == tokens
    assert _greedy_without_cache(runner, prompt, 12) == tokens
    assert runner.generate(prompt, max_new_tokens=0) == []


def test_generate_stops_at_eos_and_stop_callback(runner):
    prompt = [2, 7, 1, 8]
    tokens = runner.generate(prompt, max_new_tokens=12)
    eos = tokens[4]
    first = tokens.index(eos)
    assert runner.generate(prompt, 12, eos_token_id=eos) == tokens[:first + 1]
    assert runner.generate(prompt, 12, eos_token_id=[VOCAB + 1, eos]) == tokens[:first + 1]
    seen: list[list[int]] = []

    def stop(generated: list[int]) -> bool:
        seen.append(list(generated))
        return len(generated) == 5

    assert runner.generate(prompt, 12, stop=stop) == tokens[:5]
    assert seen == [tokens[:n] for n in range(1, 6)]
    assert runner.past_length == len(prompt) + 4  # no step is run after the last token


def test_misuse_is_refused(runner):
    with pytest.raises(RuntimeError, match="before prefill"):
        runner.decode_step(np.array([[1]]))
    runner.prefill(np.array([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        runner.decode_step(np.array([[1]]))
    runner.reset()
    assert runner.past_length == 0 and runner.cache_lengths() == []


def test_not_a_decoder(tmp_path):
    b = GraphBuilder(np.float32)
    b.input("input_ids", TensorProto.INT64, ["B", "S"])
    b.node("Identity", ["input_ids"], ["logits"], name="/identity")
    b.output("logits", TensorProto.INT64, ["B", "S"])
    save_model(b.model(), tmp_path / "model.onnx")
    session, _ = make_session(tmp_path / "model.onnx", "cpu")
    with pytest.raises(QuantcalError, match="not a quantcal decoder.*attention_mask"):
        read_spec(session)


def test_auto_falls_back_with_one_notice_and_cuda_refuses(decoder_path, monkeypatch, caplog):
    """Where CUDA cannot run, ``auto`` runs on CPU after one notice (per process) and an
    explicit ``cuda`` is an error naming the way out."""
    import quantcal.session as session_module

    monkeypatch.setattr(session_module, "cuda_unusable", lambda device_id=0: "no GPU here")
    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session_module, "_noticed", set())
    with caplog.at_level("WARNING", logger="quantcal.session"):
        session, provider = make_session(decoder_path, "auto")
        make_session(decoder_path, "auto")
    assert provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "quantcal: CUDA provider unavailable (no GPU here); running on CPU"]
    runner = DecoderRunner(session, provider)
    assert len(runner.generate([1, 2, 3], 4)) == 4
    with pytest.raises(QuantcalError, match=r"--provider cuda: .*\(no GPU here\).*--provider cpu"):
        make_session(decoder_path, "cuda")


def test_cpu_request_is_quiet(decoder_path, capsys):
    session, provider = make_session(decoder_path, "cpu")
    assert provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    assert capsys.readouterr().err == ""


def test_missing_and_corrupt_files(tmp_path, decoder_path, capsys):
    with pytest.raises(QuantcalError, match="model file not found: .*quantcal export"):
        make_session(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    for provider in ("auto", "cpu"):
        with pytest.raises(QuantcalError, match="could not load .*corrupt"):
            make_session(corrupt, provider)
    with pytest.raises(QuantcalError, match="could not load .*corrupt|--provider cuda"):
        make_session(corrupt, "cuda")  # where CUDA cannot run, that is said first
    no_data = tmp_path / "model.onnx"
    no_data.write_bytes(decoder_path.read_bytes())  # without its model.onnx.data
    with pytest.raises(QuantcalError, match="model.onnx.data"):
        make_session(no_data, "cpu")
    with pytest.raises(QuantcalError, match="unknown provider"):
        make_session(decoder_path, "tpu")
    assert "running on CPU" not in capsys.readouterr().err  # no notice before an error


def test_next_tokens_on_device_logits_equal_host_argmax(runner):
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    host = runner.prefill(ids)
    device = runner.prefill(ids, host_logits=False)
    expected = host[:, -1].argmax(-1).reshape(2, 1)
    assert isinstance(device, ort.OrtValue)
    np.testing.assert_array_equal(runner.next_tokens(device), expected)
    np.testing.assert_array_equal(runner.next_tokens(host), expected)
    step = runner.decode_step(expected, host_logits=False)
    assert step.shape() == [2, 1, host.shape[-1]]



def test_a_concat_cache_cannot_be_shared(runner):
    assert not runner.shares_cache
    with pytest.raises(ValueError, match="in place"):
        runner.prefill(np.array([[1, 2]]), cache_length=4)
    assert len(runner.generate([1, 2], 3)) == 3  # generation falls back to a growing cache
