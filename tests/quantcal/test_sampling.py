"""Sampling for ``quantcal generate`` against independent references: the filtered
distribution against transformers' own logits warpers (temperature, top-k, top-p, in the
order ``generate`` applies them), the draws against ``torch.multinomial`` with the same seed
over that reference distribution and against the distribution itself (chi-square), and the
command line end to end: greedy by default, repeatable with ``--seed``, ``--chat``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.sampling import Sampler, Sampling, filtered_probs


def _hf_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    scores = torch.tensor(logits, dtype=torch.float64)[None]  # (1, V)
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.softmax(-1)[0].numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.9), (1.3, 20, 0.5), (0.5, 3, 0.99),
    (1.0, 0, 0.05)])
@pytest.mark.parametrize("seed", range(4))
def test_filtered_distribution_equals_transformers_warpers(temperature, top_k, top_p, seed):
    logits = np.random.default_rng(seed).normal(0, 3, size=97).astype(np.float32)
    got = filtered_probs(logits, temperature, top_k, top_p)
    ref = _hf_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(ref))


def test_draws_are_torch_multinomial_with_the_seed_over_the_reference():
    logits = np.random.default_rng(7).normal(0, 2, size=50)
    ref = torch.from_numpy(_hf_probs(logits, 0.9, 10, 0.8))
    gen = torch.Generator().manual_seed(1234)
    expected = [int(torch.multinomial(ref, 1, generator=gen)) for _ in range(200)]
    sampler = Sampler(Sampling(temperature=0.9, top_k=10, top_p=0.8, seed=1234))
    assert [sampler(logits) for _ in range(200)] == expected


def test_draws_follow_the_distribution():
    """Chi-square goodness of fit of 20,000 draws (p > 1e-4: fails by chance once in 10^4)."""
    from scipy.stats import chisquare

    logits = np.random.default_rng(3).normal(0, 1.5, size=12)
    ref = _hf_probs(logits, 1.2, 8, 0.95)
    sampler = Sampler(Sampling(temperature=1.2, top_k=8, top_p=0.95, seed=5))
    counts = np.bincount([sampler(logits) for _ in range(20_000)], minlength=12)
    kept = ref > 0
    assert counts[~kept].sum() == 0  # never a filtered-out token
    assert chisquare(counts[kept], 20_000 * ref[kept]).pvalue > 1e-4


def test_greedy_is_the_argmax_and_sampling_options_are_checked():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(Sampling())(logits) == 1
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")),
                dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
                dict(temperature=1.0, top_k=-2), dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(QuantcalError):
            Sampling(**bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, c4_file):
    out = tmp_path_factory.mktemp("sampling") / "run"
    for argv in (["calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples",
                  "4", "--seq-len", "32", "--sensitivity", "fast", "--sensitivity-samples",
                  "2", "--keep", "*", "--device", "cpu", "--run", str(out)],
                 ["export", "--provider", "cpu", "--run", str(out)]):
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, res.output
    return out


def _generate(run, *args):
    res = CliRunner().invoke(cli, ["generate", "--run", str(run), "--provider", "cpu",
                                   "--max-new-tokens", "12", *args])
    assert res.exit_code == 0, res.output
    return res.stdout


def test_generate_is_greedy_by_default_and_sampling_repeats_with_its_seed(run):
    prompt = ["--prompt", "The city of"]
    assert _generate(run, *prompt) == _generate(run, *prompt, "--temperature", "0")
    one = _generate(run, *prompt, "--temperature", "1.5", "--seed", "1")
    assert one == _generate(run, *prompt, "--temperature", "1.5", "--seed", "1")
    others = {_generate(run, *prompt, "--temperature", "1.5", "--seed", str(s))
              for s in range(2, 6)}
    assert others - {one}, "four other seeds gave the same text"  # a random 512-token model
    assert _generate(run, *prompt, "--temperature", "1.5", "--top-k", "1",
                     "--seed", "9") == _generate(run, *prompt)  # top-1 sampling is greedy


def test_generate_chat_applies_the_tokenizer_template(run, tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: "
                         "{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(tmp_path / "chat-tok")
    templated = "<|endoftext|>user: Hello there\nassistant:"
    reply = _generate(run, "--prompt", "Hello there", "--chat", "--tokenizer",
                      str(tmp_path / "chat-tok"))
    plain = _generate(run, "--prompt", templated, "--tokenizer", str(tmp_path / "chat-tok"))
    assert plain.startswith(templated) and reply == plain[len(templated):]
    res = CliRunner().invoke(cli, ["generate", "--run", str(run), "--provider", "cpu",
                                   "--prompt", "Hi", "--chat"])  # no template: one line
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "chat template" in res.output
