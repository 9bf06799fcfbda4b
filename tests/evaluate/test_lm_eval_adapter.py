"""The lm-evaluation-harness model ``quantcal`` (evaluate/lm_eval_adapter.py) against two
independent references, offline on CPU:

- ``quantcal eval``: lm-eval's own ``hellaswag`` and ``gsm8k`` YAML tasks (their dataset
  pointed at local JSON-lines files), run by ``lm_eval.simple_evaluate`` through the
  adapter on an exported tiny Llama, give the acc, acc_norm and exact_match (values and
  standard errors) that quantcal's own tasks and evaluator give on the same documents, from
  the same prompts (lm-eval builds its requests, quantcal builds its own);
- lm-eval's own ``HFLM`` on the tests' tiny Llama: the same log-likelihoods, rolling
  log-likelihoods over several windows and greedy generations.

And the command line: ``python -m quantcal.evaluate.lm_eval_cli --model quantcal`` runs
lm-eval's CLI, and bad input ends with one line and exit status 2. lm-eval is in the
``test`` extra; without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.evaluate.backends import make_backend
from quantcal.evaluate.lm_eval_cli import main
from quantcal.evaluate.tasks import get_task
from quantcal.rundir import RunDir

from tinymodels import export_unquantized, tiny_config

FIXTURES = Path(__file__).parent / "fixtures"
HS = json.loads((FIXTURES / "hellaswag_lm_eval.json").read_text(encoding="utf-8"))
N_HS, N_GSM = 20, 2  # documents compared (every golden HellaSwag row); GSM8K: 256 tokens each
GSM_METRICS = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}

try:
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from quantcal.evaluate.lm_eval_adapter import QuantcalLM, greedy_settings
    MISSING = None
except ImportError as exc:
    MISSING = exc


@pytest.fixture(scope="module", autouse=True)
def _lm_eval_installed():
    """lm-eval is in the test extra: without it every test here fails (none skips), and
    the rest of the suite still runs."""
    if MISSING is not None:
        pytest.fail(f"lm-eval is needed by this test ({MISSING}): pip install -e '.[test]'",
                    pytrace=False)


def _task_yaml(name: str, base: str, files: dict[str, Path], cache: Path) -> str:
    """lm-eval's own task config ``base``, its dataset replaced by local JSON-lines files."""
    config = Path(lm_eval.__file__).parent / "tasks" / base
    lines = [f"include: {config}", f"task: {name}", "tag: []", "dataset_path: json",
             "dataset_name: null", "dataset_kwargs:", f"  cache_dir: {cache}", "  data_files:"]
    return "\n".join(lines + [f"    {split}: {path}" for split, path in files.items()]) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_data):
    """A data folder for ``quantcal eval`` (HellaSwag rows with the hub's fields, the
    shipped GSM8K rows) and an lm-eval include path whose tasks read the same files."""
    root = tmp_path_factory.mktemp("lm-eval-data")
    (root / "hellaswag").mkdir()
    hs = root / "hellaswag" / "hellaswag_val.jsonl"
    hs.write_text("".join(json.dumps(d["row"]) + "\n" for d in HS["docs"]), encoding="utf-8")
    (root / "gsm8k").symlink_to(sample_data / "gsm8k", target_is_directory=True)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(_task_yaml(
        "hellaswag_local", "hellaswag/hellaswag.yaml", {"validation": hs, "train": hs},
        root / "cache"))
    (tasks / "gsm8k_local.yaml").write_text(_task_yaml(
        "gsm8k_local", "gsm8k/gsm8k.yaml", {"test": root / "gsm8k" / "test.jsonl",
                                            "train": root / "gsm8k" / "train.jsonl"},
        root / "cache"))
    return root


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with room for GSM8K's 5-shot prompts and 256 new tokens, exported
    to fp32 ONNX in a folder that holds its tokenizer and config."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tmp_path_factory.mktemp("tiny-llama-4k")
    config = tiny_config("llama")
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    out = tmp_path_factory.mktemp("tiny-llama-4k-onnx")
    export_unquantized(source, out / "model.onnx")
    config.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _quantcal_eval(model: Path, run: Path, data: Path, task: str, limit: int) -> dict:
    result = CliRunner().invoke(cli, [
        "eval", str(model), "--tasks", task, "--limit", str(limit), "--provider", "cpu",
        "--batch-size", "4", "--data-dir", str(data), "--run", str(run)])
    assert result.exit_code == 0, result.output
    (variant,) = json.loads((run / "eval.json").read_text())["variants"].values()
    return variant["metrics"][task]


def test_lm_eval_tasks_through_the_adapter_match_quantcal_eval(data, export_dir, tmp_path):
    ours = {"hellaswag": _quantcal_eval(export_dir, tmp_path, data, "hellaswag", N_HS),
            "gsm8k": _quantcal_eval(export_dir, tmp_path, data, "gsm8k", N_GSM)}
    out = lm_eval.simple_evaluate(
        model="quantcal", model_args={"path": str(export_dir), "provider": "cpu"},
        batch_size=4, tasks=["hellaswag_local", "gsm8k_local"],
        task_manager=TaskManager(include_path=str(data / "tasks")),
        samples={"hellaswag_local": list(range(N_HS)), "gsm8k_local": list(range(N_GSM))},
        log_samples=True)
    theirs = out["results"]
    assert out["config"]["quantcal_backend"] == "onnx-cpu"
    for metric in ("acc", "acc_norm"):
        value, stderr = ours["hellaswag"][metric]
        assert theirs["hellaswag_local"][f"{metric},none"] == pytest.approx(value, abs=1e-12)
        assert theirs["hellaswag_local"][f"{metric}_stderr,none"] == pytest.approx(stderr)
    for name, metric in GSM_METRICS.items():
        value, stderr = ours["gsm8k"][metric]
        assert theirs["gsm8k_local"][f"exact_match,{name}"] == pytest.approx(value, abs=1e-12)
        assert theirs["gsm8k_local"][f"exact_match_stderr,{name}"] == pytest.approx(stderr)
    # all-right or all-wrong accuracies would agree whatever the requests; the random model's
    # GSM8K scores are 0, so its generations are compared text for text below
    assert 0 < ours["hellaswag"]["acc"][0] < 1 and 0 < ours["hellaswag"]["acc_norm"][0] < 1
    _same_requests_and_answers(out["samples"], data, export_dir)


def _same_requests_and_answers(samples: dict, data: Path, export_dir: Path) -> None:
    """lm-eval's requests and responses per document against quantcal's own task's
    requests answered by a fresh backend: scores that agree by accident would not."""
    backend = make_backend(str(export_dir), RunDir(export_dir), provider="cpu")
    hs_task = get_task("hellaswag")
    for sample, doc in zip(sorted(samples["hellaswag_local"], key=lambda s: s["doc_id"]),
                           hs_task.load(data, limit=N_HS), strict=True):
        pairs = [(r.context, r.continuation) for r in hs_task.requests(doc)]
        assert [tuple(a) for a in sample["arguments"]] == pairs
        expect = backend.loglikelihood(pairs)
        got = [resp[0] for resp in sample["resps"]]
        assert [g[1] for g in got] == [e[1] for e in expect]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expect], abs=1e-4)
    gsm_task = get_task("gsm8k")
    strict = [s for s in samples["gsm8k_local"] if s["filter"] == "strict-match"]
    for sample, doc in zip(sorted(strict, key=lambda s: s["doc_id"]),
                           gsm_task.load(data, limit=N_GSM), strict=True):
        (request,) = gsm_task.requests(doc)
        ((context, gen_kwargs),) = sample["arguments"]
        assert context == request.context
        assert greedy_settings(gen_kwargs) == (request.until, request.max_new_tokens)
        (expect,) = backend.generate_until([(request.context, request.until,
                                             request.max_new_tokens)])
        assert sample["resps"][0][0] == expect and len(expect) > 20


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_adapter_matches_lm_eval_hflm_on_torch(tiny_llama_dir, c4_texts):
    from lm_eval.models.huggingface import HFLM

    ours = QuantcalLM(path=str(tiny_llama_dir), batch_size=4)
    hflm = HFLM(pretrained=str(tiny_llama_dir), batch_size=4, device="cpu")
    assert ours.backend.max_length == hflm.max_length == 256
    requests = _instances("loglikelihood", [tuple(r) for d in HS["docs"] for r in d["requests"]]
                          + [("", " An empty context"), ("Long. " * 200, " cut on the left")])
    got, expect = ours.loglikelihood(requests), hflm.loglikelihood(requests, disable_tqdm=True)
    assert [g[1] for g in got] == [e[1] for e in expect]
    # HFLM sums float32 log-probs, the backends float64
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expect], rel=1e-6, abs=1e-4)

    texts = [c4_texts[0][:300], " ".join(c4_texts[1:4])]  # one window; several of 256 tokens
    assert len(ours.backend.tok_encode(texts[1])) > 2 * hflm.max_length
    rolling = _instances("loglikelihood_rolling", [(t,) for t in texts])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        hflm.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-5)
    prompts = [(t[:200], {"until": ["."], "max_gen_toks": 24, "do_sample": False})
               for t in c4_texts[4:7]]
    prompts.append((c4_texts[7][:150], {"until": ["Question:"], "max_gen_toks": 16}))
    generate = _instances("generate_until", prompts)
    # one request per HFLM call: in a batch, HF's generate runs a row on past the tokenizer's
    # eos (the tiny config names another eos) and HFLM's decoding then drops that eos
    expect = [hflm.generate_until([g], disable_tqdm=True)[0] for g in generate]
    assert ours.generate_until(generate) == expect

    with pytest.raises(QuantcalError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    ours.backend.tokenizer.chat_template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<hi>"


def test_the_cli_runs_lm_eval_with_the_quantcal_model(data, export_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "quantcal.evaluate.lm_eval_cli", "--model", "quantcal",
         "--model_args", f"path={export_dir / 'model.onnx'},provider=cpu", "--tasks",
         "hellaswag_local", "--include_path", str(data / "tasks"), "--limit", "2",
         "--batch_size", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hellaswag_local" in out.stdout and "acc_norm" in out.stdout


@pytest.mark.parametrize("model_args, says", [
    ("path=/no/such/model.onnx,provider=cpu", "model file not found"),
    ("path={export},provider=cpu,beams=4", "has no argument beams"),
    ("path={export},batch_size=4", "give it once"),  # lm-eval passes its --batch_size too
])
def test_bad_input_is_one_line_and_exit_2(data, export_dir, capsys, model_args, says):
    with pytest.raises(SystemExit) as stop:
        main(["--model", "quantcal", "--model_args", model_args.format(export=export_dir),
              "--tasks", "hellaswag_local", "--include_path", str(data / "tasks"),
              "--limit", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("quantcal-lm-eval: error: ") and says in err[-1]


@pytest.mark.parametrize("kwargs, says", [
    ({"path": "x", "pretrained": "y"}, "exactly once"),
    ({"path": "x", "batch_size": "auto"}, "whole number"),
    ({"path": "x", "dtype": "int3"}, "unknown dtype"),
    ({"path": "x", "provider": "tpu"}, "unknown provider"),
])
def test_bad_model_arguments_are_refused(kwargs, says):
    with pytest.raises(QuantcalError, match=says):
        QuantcalLM(**kwargs)


def test_lm_eval_default_cuda_device_runs_on_cpu_without_cuda(tiny_llama_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert QuantcalLM(path=str(tiny_llama_dir), device="cuda:0").backend.device.type == "cpu"


def test_greedy_settings_read_lm_eval_gen_kwargs():
    assert greedy_settings({"until": "\n\n", "max_new_tokens": 7}) == (("\n\n",), 7)
    assert greedy_settings({"until": ["Q:"], "temperature": 0.0}) == (("Q:",), 256)
    with pytest.raises(QuantcalError, match="greedily only"):
        greedy_settings({"do_sample": True, "temperature": 0.7})
