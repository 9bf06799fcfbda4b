"""Scoring backends on tiny random models: the torch model and its fp32 ONNX export score
and generate alike, loglikelihood is lm-eval's (checked by hand), batching changes nothing,
a run's plan (token embedding included) applied as fake-quant changes the scores (and matches
that plan's export), and ``make_backend`` picks the right backend or says what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.evaluate.backends import Backend, OnnxBackend, TorchBackend, make_backend
from quantcal.rundir import RunDir

from tinymodels import export_unquantized


@pytest.fixture(scope="module")
def requests_(c4_texts):
    texts = [t for t in c4_texts[:40] if len(t) > 200][:6]
    reqs = [(t[:90], t[90:130]) for t in texts]
    reqs += [("The weather today is ", "sunny and warm"), ("", " hello world"),
             ("Numbers: 1, 2, 3,", " 4, 5"), reqs[0], reqs[0]]  # duplicates batch together
    return reqs


def _pair(model_dir, tmp_path_factory, batch_size=4):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_unquantized(model_dir, path)
    torch_b = TorchBackend.from_pretrained(str(model_dir), "cpu", torch.float32,
                                           batch_size=batch_size)
    onnx_b = OnnxBackend(path, torch_b.tokenizer, "cpu", batch_size=batch_size,
                         max_length=torch_b.max_length, eos_token_ids=torch_b.eos_token_ids)
    return torch_b, onnx_b


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    return _pair(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_pair(tiny_llama_dir, tmp_path_factory):
    return _pair(tiny_llama_dir, tmp_path_factory)


def test_torch_and_onnx_agree(pair, requests_):
    torch_b, onnx_b = pair
    assert isinstance(torch_b, Backend) and isinstance(onnx_b, Backend)
    ref, got = torch_b.loglikelihood(requests_), onnx_b.loglikelihood(requests_)
    assert np.allclose([r[0] for r in got], [r[0] for r in ref], atol=1e-3, rtol=0)
    assert [r[1] for r in got] == [r[1] for r in ref]
    ids = torch_b.tok_encode(requests_[0][0] + requests_[0][1])
    assert np.allclose(onnx_b.token_logprobs(ids), torch_b.token_logprobs(ids), atol=1e-3)
    gens = [(c, (), 12) for c, _ in requests_[:3]] + [("", (".",), 8)]
    assert onnx_b.generate_until(gens) == torch_b.generate_until(gens)


def test_loglikelihood_by_hand(llama_pair):
    torch_b, _ = llama_pair
    tok, model = torch_b.tokenizer, torch_b.model
    context, continuation = "The cat sat on the ", "mat today"
    # lm-eval: the trailing space moves to the continuation; no special tokens
    ctx = tok("The cat sat on the", add_special_tokens=False).input_ids
    whole = tok("The cat sat on the mat today", add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    assert torch_b.encode_pair(context, continuation) == (ctx, cont)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    positions = range(len(ctx) - 1, len(whole) - 1)
    expected = sum(float(logp[p, whole[p + 1]]) for p in positions)
    greedy = all(int(logits[p].argmax()) == whole[p + 1] for p in positions)
    (score, is_greedy), = torch_b.loglikelihood([(context, continuation)])
    assert score == pytest.approx(expected, abs=1e-4) and is_greedy == greedy
    lp = torch_b.token_logprobs(whole)
    assert lp.shape == (len(whole) - 1,) and lp[len(ctx) - 1:].sum() == pytest.approx(score)


def test_greedy_flag_true_for_the_models_own_continuation(llama_pair):
    torch_b, onnx_b = llama_pair
    context = "The weather today is"
    prompt = torch_b.tok_encode(context)
    new = torch_b._greedy(prompt, 4, lambda _: False)
    continuation = torch_b.tokenizer.decode(new)
    assert torch_b.encode_pair(context, continuation)[1] == new  # clean round trip
    assert torch_b.loglikelihood([(context, continuation)])[0][1] is True
    assert onnx_b.loglikelihood([(context, continuation)])[0][1] is True
    assert torch_b.loglikelihood([(context, continuation + "zq")])[0][1] is False


def test_batching_does_not_change_results(llama_pair, requests_):
    for backend in llama_pair:
        batched = backend.loglikelihood(requests_)
        backend.batch_size = 1
        try:
            single = backend.loglikelihood(requests_)
        finally:
            backend.batch_size = 4
        assert np.allclose([r[0] for r in batched], [r[0] for r in single], atol=1e-5)
        assert [r[1] for r in batched] == [r[1] for r in single]
        assert batched[0] == batched[-1]  # order restored for duplicates


def test_stop_strings_cut_generation(llama_pair):
    torch_b, onnx_b = llama_pair
    free = torch_b.generate_until([("Once upon a time", (), 24)])[0]
    assert len(free) > 6
    stop = free[4:6]
    cut = free[:free.index(stop)]
    for backend in llama_pair:
        assert backend.generate_until([("Once upon a time", (stop, "\x00zz"), 24)]) == [cut]
        assert backend.generate_until([("Once upon a time", (), 0)]) == [""]
    # stops once the stop string appears: fewer tokens than the limit
    stops = []
    onnx_b._greedy(onnx_b.tok_encode("Once upon a time"), 24,
                   lambda t: stops.append(len(t)) or stop in onnx_b.tokenizer.decode(t))
    assert stops[-1] < 24


def test_truncates_from_the_left(llama_pair):
    torch_b, onnx_b = llama_pair
    long_context = "word " * 400  # more tokens than the 256 positions
    for backend in llama_pair:
        (score, _), = backend.loglikelihood([(long_context, "end")])
        assert np.isfinite(score)
        assert isinstance(backend.generate_until([(long_context, (), 3)])[0], str)
    with pytest.raises(ValueError, match="token_logprobs needs"):
        torch_b.token_logprobs(list(range(300)))


@pytest.fixture(scope="module")
def quant_run(tiny_llama_dir, c4_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("quant") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data",
        c4_file, "--samples", "4", "--seq-len",
        "32", "--batch-size", "2", "--sensitivity", "fast", "--sensitivity-samples", "2",
        "--formats", "int4-g32", "--target-bits", "5", "--force",
        "model.embed_tokens=int4-g32", "--run", str(run)])
    assert res.exit_code == 0, res.output
    return RunDir(run)


def test_fake_quant_plan_changes_scores_and_matches_its_export(tiny_llama_dir, quant_run,
                                                               llama_pair, requests_):
    assert quant_run.read_plan().layers["model.embed_tokens"].format.name == "int4-g32"
    fp = llama_pair[0].loglikelihood(requests_)
    fq = TorchBackend.from_pretrained(str(tiny_llama_dir), "cpu", torch.float32,
                                      plan_run=quant_run, batch_size=4)
    assert fq.name == "torch-fakequant"
    quantized = fq.loglikelihood(requests_)
    assert max(abs(a[0] - b[0]) for a, b in zip(quantized, fp)) > 1e-2
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(quant_run.path)])
    assert res.exit_code == 0, res.output
    exported = make_backend(None, quant_run, provider="cpu")
    assert isinstance(exported, OnnxBackend) and exported.max_length == fq.max_length
    got = exported.loglikelihood(requests_)
    assert np.allclose([r[0] for r in got], [r[0] for r in quantized], atol=1e-3)
    fq.close()  # the original modules come back
    assert np.allclose([r[0] for r in fq.loglikelihood(requests_)], [r[0] for r in fp],
                       atol=1e-5)


def test_make_backend_routes_and_errors(tiny_llama_dir, llama_pair, tmp_path):
    run = RunDir(tmp_path / "run")
    torch_b = make_backend(str(tiny_llama_dir), run, device="cpu")
    assert isinstance(torch_b, TorchBackend) and torch_b.name == "torch"
    onnx_path = llama_pair[1].path
    with pytest.raises(QuantcalError, match="no tokenizer"):
        make_backend(str(onnx_path), run, provider="cpu")
    llama_pair[0].tokenizer.save_pretrained(onnx_path.parent)  # tokenizer beside the model
    onnx_b = make_backend(str(onnx_path.parent), run, provider="cpu")
    assert isinstance(onnx_b, OnnxBackend) and onnx_b.path == onnx_path
    with pytest.raises(QuantcalError, match="does not exist"):
        make_backend(None, run)
    with pytest.raises(QuantcalError, match="model file not found"):
        make_backend(str(tmp_path / "missing.onnx"), run)
    with pytest.raises(QuantcalError, match="fake-quant applies to a torch model"):
        make_backend(str(onnx_path), run, fake_quant=True)
