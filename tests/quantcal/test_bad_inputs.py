"""Every bad input ends in one clear line: ``quantcal: error: ...`` on stderr, exit status 2,
no traceback, and no file of the working directory (the run directory among them) changed.

One table, every command: each case is the argv (placeholders filled per test), words the
line must hold, and optionally a quantcal.toml or a damage done to the run directory first.
The run directory is a real tiny calibrated and exported run, copied for every case.

Click's usage errors (bad choice, bad number, missing option) follow the same rule: one
``quantcal: error:`` line, no usage block. The one other thing allowed on stderr is a
progress bar of work done before the input could be judged (transformers' "Loading
weights" bar, when a check needs the model's shape): it is progress, not an error line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal.cli import cli

CAL = ["calibrate", "--model", "{model}", "--data", "{data}", "--samples", "4", "--seq-len",
       "32", "--sensitivity-samples", "2", "--device", "cpu", "--run", "out"]
PLAN = ["plan", "--run", "run", "--no-measure"]
EXPORT = ["export", "--run", "run", "--provider", "cpu"]
GEN = ["generate", "--run", "run", "--provider", "cpu", "--prompt", "Hello world"]
EVAL = ["eval", "--run", "run", "--provider", "cpu", "--data-dir", "{datadir}"]
BENCH = ["bench", "--run", "run", "--provider", "cpu"]
CAL_TOML = ["calibrate", "--model", "{model}", "--data", "{data}", "--seq-len", "32",
            "--device", "cpu", "--run", "out"]  # no --samples: the toml's value is used

# (case id, argv, words the error line holds, quantcal.toml text or None, damage or None)
CASES = [
    # calibrate: sizes and counts
    ("cal-samples-0", CAL + ["--samples", "0"], "--samples", None, None),
    ("cal-samples-negative", CAL + ["--samples", "-3"], "--samples", None, None),
    ("cal-samples-text", CAL + ["--samples", "abc"], "--samples", None, None),
    ("cal-seq-len-0", CAL + ["--seq-len", "0"], "--seq-len", None, None),
    ("cal-batch-size-0", CAL + ["--batch-size", "0"], "--batch-size", None, None),
    ("cal-sens-samples-0", CAL + ["--sensitivity-samples", "0"], "--sensitivity-samples",
     None, None),
    ("cal-seq-len-beyond-model", CAL + ["--seq-len", "100000"], "--seq-len 256", None, None),
    # calibrate: budgets
    ("cal-bits-0", CAL + ["--target-bits", "0"], "--target-bits", None, None),
    ("cal-bits-negative", CAL + ["--target-bits", "-1"], "--target-bits", None, None),
    ("cal-bits-nan", CAL + ["--target-bits", "nan"], "--target-bits", None, None),
    ("cal-bits-inf", CAL + ["--target-bits", "inf"], "--target-bits", None, None),
    ("cal-bits-below-any-format", CAL + ["--target-bits", "3"], "4.125", None, None),
    ("cal-bits-above-fp16", CAL + ["--target-bits", "17"], "16", None, None),
    ("cal-kl-0", CAL + ["--max-kl", "0"], "--max-kl", None, None),
    ("cal-kl-negative", CAL + ["--max-kl", "-1"], "--max-kl", None, None),
    ("cal-kl-inf", CAL + ["--max-kl", "inf"], "--max-kl", None, None),
    ("cal-kl-nan", CAL + ["--max-kl", "nan"], "--max-kl", None, None),
    ("cal-size-0", CAL + ["--max-size", "0"], "--max-size", None, None),
    ("cal-size-text", CAL + ["--max-size", "big"], "--max-size", None, None),
    ("cal-size-negative", CAL + ["--max-size", "-5MB"], "--max-size", None, None),
    ("cal-size-infeasible", CAL + ["--max-size", "1KB"], "--max-size", None, None),
    ("cal-two-budgets", CAL + ["--target-bits", "8", "--max-kl", "1"], "one budget",
     None, None),
    ("cal-bits-infeasible-formats", CAL + ["--formats", "int8,w8a8", "--target-bits", "4.5"],
     "formats int8,w8a8: they reach", None, None),
    # calibrate: names and choices
    ("cal-format-unknown", CAL + ["--formats", "int3"], "int3", None, None),
    ("cal-format-empty", CAL + ["--formats", ""], "--formats", None, None),
    ("cal-format-bad-group", CAL + ["--formats", "int4-g100"], "group size", None, None),
    ("cal-dtype-nonsense", CAL + ["--dtype", "float64"], "--dtype", None, None),
    ("cal-device-cuda-none", CAL + ["--device", "cuda"], "CUDA", None, None),
    ("cal-device-nonsense", CAL + ["--device", "tpu"], "--device", None, None),
    ("cal-observer-unknown", CAL + ["--observer", "foo"], "--observer", None, None),
    ("cal-force-no-equals", CAL + ["--force", "lm_head"], "PATTERN=FORMAT", None, None),
    ("cal-force-bad-format", CAL + ["--force", "lm_head=int3"], "int3", None, None),
    ("cal-keep-matches-nothing", CAL + ["--keep", "nothing.here"], "matches no layer",
     None, None),
    ("cal-model-missing", CAL + ["--model", "./no-such-model"], "no-such-model", None, None),
    ("cal-data-missing", CAL + ["--data", "./no-such.jsonl"], "no-such.jsonl", None, None),
    ("cal-run-is-a-file", CAL + ["--run", "afile.txt"], "afile.txt", None, None),
    ("cal-model-required", ["calibrate", "--run", "out"], "--model", None, None),
    ("cal-unknown-option", CAL + ["--sampels", "4"], "--sampels", None, None),
    # plan
    ("plan-bits-0", PLAN + ["--target-bits", "0"], "--target-bits", None, None),
    ("plan-bits-infeasible", PLAN + ["--target-bits", "4.2"], "pass --target-bits 4.625 or more",
     None, None),
    ("plan-kl-inf", PLAN + ["--max-kl", "inf"], "--max-kl", None, None),
    ("plan-kl-0", PLAN + ["--max-kl", "0"], "--max-kl", None, None),
    ("plan-size-infeasible", PLAN + ["--max-size", "1KB"], "--max-size", None, None),
    ("plan-force-bad-format", PLAN + ["--force", "*.q_proj=nope"], "nope", None, None),
    ("plan-run-missing", ["plan", "--run", "nowhere"], "nowhere", None, None),
    ("plan-run-is-a-file", ["plan", "--run", "afile.txt"], "afile.txt", None, None),
    ("plan-corrupt-sensitivity", PLAN, "sensitivity.json", None, "corrupt:sensitivity.json"),
    ("plan-output-under-a-file", PLAN + ["--target-bits", "8", "-o", "afile.txt/plan.json"],
     "afile.txt", None, None),
    ("plan-keep-matches-nothing", PLAN + ["--keep", "nothing.here"], "matches no layer",
     None, None),
    # export
    ("export-plan-missing", EXPORT + ["--plan", "missing.json"], "missing.json", None, None),
    ("export-plan-corrupt", EXPORT, "plan.json", None, "corrupt:plan.json"),
    ("export-plan-unknown-format", EXPORT, "int3", None, "plan-format:int3"),
    ("export-provider-unknown", ["export", "--run", "run", "--provider", "tpu"],
     "--provider", None, None),
    ("export-run-missing", ["export", "--run", "nowhere"], "nowhere", None, None),
    ("export-run-json-corrupt", EXPORT, "run.json", None, "corrupt:run.json"),
    ("export-output-under-a-file", EXPORT + ["-o", "afile.txt/model.onnx"], "afile.txt",
     None, None),
    # generate
    ("gen-max-new-0", GEN + ["--max-new-tokens", "0"], "--max-new-tokens", None, None),
    ("gen-max-new-negative", GEN + ["--max-new-tokens", "-5"], "--max-new-tokens", None, None),
    ("gen-beyond-positions", GEN + ["--max-new-tokens", "1000"], "--max-new-tokens",
     None, None),
    ("gen-empty-prompt", ["generate", "--run", "run", "--provider", "cpu", "--prompt", ""],
     "--prompt", None, None),
    ("gen-model-missing", GEN + ["--model", "missing.onnx"], "missing.onnx", None, None),
    ("gen-model-not-onnx", GEN + ["--model", "run/run.json"], "run.json", None, None),
    ("gen-provider-unknown", GEN + ["--provider", "tpu"], "--provider", None, None),
    ("gen-prompt-required", ["generate", "--run", "run"], "--prompt", None, None),
    ("gen-tokenizer-missing", GEN + ["--tokenizer", "./no-such-tokenizer"], "--tokenizer",
     None, None),
    # eval
    ("eval-tasks-empty", EVAL + ["--tasks", ""], "hellaswag", None, None),
    ("eval-tasks-unknown", EVAL + ["--tasks", "mmlu"], "hellaswag", None, None),
    ("eval-limit-0", EVAL + ["--tasks", "gsm8k", "--limit", "0"], "--limit", None, None),
    ("eval-sample-0", EVAL + ["--tasks", "gsm8k", "--sample", "0"], "--sample", None, None),
    ("eval-seq-len-0", EVAL + ["--tasks", "wikitext2", "--seq-len", "0"], "--seq-len",
     None, None),
    ("eval-stride-0", EVAL + ["--tasks", "wikitext2", "--stride", "0"], "--stride", None, None),
    ("eval-stride-over-seq-len", EVAL + ["--tasks", "wikitext2", "--seq-len", "32",
                                         "--stride", "64"], "--stride", None, None),
    ("eval-stride-over-default-window", EVAL + ["--tasks", "wikitext2", "--stride", "300"],
     "--stride 256", None, None),
    ("eval-tasks-twice", EVAL + ["--tasks", "wikitext2,wikitext2"], "twice", None, None),
    ("eval-seq-len-beyond-model", EVAL + ["--tasks", "wikitext2", "--seq-len", "1000"],
     "256", None, None),
    ("eval-sample-too-many", EVAL + ["--tasks", "gsm8k", "--sample", "100000"],
     "(20 documents)", None, None),  # tests/data's gsm8k test split holds 20
    ("eval-limit-too-many", EVAL + ["--tasks", "gsm8k", "--limit", "100000"],
     "(20 documents)", None, None),
    ("eval-limit-and-sample", EVAL + ["--tasks", "gsm8k", "--limit", "5", "--sample", "5"],
     "--limit", None, None),
    ("eval-batch-size-0", EVAL + ["--tasks", "wikitext2", "--limit", "1", "--batch-size", "0"],
     "--batch-size", None, None),
    ("eval-device-nonsense", EVAL + ["--tasks", "wikitext2", "--limit", "1", "--device", "tpu"],
     "--device", None, None),
    ("eval-provider-unknown", ["eval", "--run", "run", "--provider", "tpu"], "--provider",
     None, None),
    ("eval-data-dir-missing", ["eval", "--run", "run", "--provider", "cpu", "--tasks",
                               "gsm8k", "--data-dir", "nodata"], "nodata", None, None),
    ("eval-model-missing", EVAL + ["missing.onnx"], "missing.onnx", None, None),
    # bench
    ("bench-prompt-len-0", BENCH + ["--prompt-len", "0"], "--prompt-len", None, None),
    ("bench-new-tokens-0", BENCH + ["--new-tokens", "0"], "--new-tokens", None, None),
    ("bench-batch-size-0", BENCH + ["--batch-size", "0"], "--batch-size", None, None),
    ("bench-prompt-beyond-positions", BENCH + ["--prompt-len", "1024"], "--prompt-len",
     None, None),
    ("bench-decode-beyond-positions", BENCH + ["--prompt-len", "32", "--new-tokens", "1000"],
     "--new-tokens", None, None),
    ("bench-model-missing", ["bench", "missing.onnx", "--provider", "cpu"], "missing.onnx",
     None, None),
    ("bench-baseline-missing", BENCH + ["--prompt-len", "32", "--new-tokens", "8",
                                        "--baseline", "missing.onnx"], "missing.onnx",
     None, None),
    ("bench-provider-unknown", BENCH + ["--provider", "tpu"], "--provider", None, None),
    ("bench-calibrate-samples-0", ["bench", "calibrate", "--samples", "0"], "--samples",
     None, None),
    ("bench-shape-unknown", ["bench", "calibrate", "--shape", "gpt-5"], "--shape", None, None),
    ("bench-device-nonsense", ["bench", "calibrate", "--device", "tpu"], "--device",
     None, None),
    # report
    ("report-run-missing", ["report", "--run", "nowhere"], "nowhere", None, None),
    ("report-run-is-a-file", ["report", "--run", "afile.txt"], "afile.txt", None, None),
    ("report-plan-corrupt", ["report", "--run", "run"], "plan.json", None, "corrupt:plan.json"),
    # quantcal.toml
    ("toml-run-not-a-path", ["export"], "run = 5", "run = 5\n", None),
    ("toml-bits-a-list", CAL, "target_bits = [1, 2]", "[calibrate]\ntarget_bits = [1, 2]\n",
     None),
    ("toml-samples-0", CAL_TOML, "samples = 0",
     "[calibrate]\nsamples = 0\n", None),
    ("toml-samples-text", CAL_TOML, "samples = \"ten\"",
     "[calibrate]\nsamples = \"ten\"\n", None),
    ("toml-dtype-choice", CAL, "float64", "[calibrate]\ndtype = \"float64\"\n", None),
    ("toml-flag-not-bool", CAL, "sequential", "[calibrate]\nsequential = \"yes\"\n", None),
    ("toml-hessian-int", CAL, "hessian", "[calibrate]\nhessian = 1\n", None),
    ("toml-keep-not-list", CAL, "keep", "[calibrate]\nkeep = \"lm_head\"\n", None),
    ("toml-keep-not-strings", CAL, "keep", "[calibrate]\nkeep = [1, 2]\n", None),
    ("toml-tasks-empty", EVAL, "tasks", "[eval]\ntasks = \"\"\n", None),
    ("toml-kl-inf", ["plan", "--run", "run", "--no-measure"], "max_kl", "[plan]\nmax_kl = inf\n",
     None),
    ("toml-provider-int", ["export", "--run", "run"], "provider", "[export]\nprovider = 5\n",
     None),
    ("toml-size-number", CAL, "max_size", "[calibrate]\nmax_size = 90\n", None),
    ("toml-max-new-float", GEN, "max_new_tokens", "[generate]\nmax_new_tokens = 1.5\n", None),
    ("toml-formats-unknown", CAL_TOML, "int3", "[calibrate]\nformats = \"int3\"\n", None),
    ("toml-device-unknown", CAL_TOML, "device", "[calibrate]\ndevice = \"tpu\"\n", None),
    ("toml-force-bad-format", CAL_TOML, "force", "[calibrate]\nforce = [\"lm_head=int3\"]\n",
     None),
    ("toml-eval-sample-0", EVAL, "sample = 0", "[eval]\nsample = 0\n", None),
    ("toml-top-level-run-is-file", ["report"], "afile.txt", "run = \"afile.txt\"\n", None),
    ("toml-unknown-table", ["export", "--run", "run"], "calibrat", "[calibrat]\nsamples = 4\n",
     None),
    ("toml-invalid", ["export", "--run", "run"], "not valid TOML", "model = \n", None),
]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, tiny_llama_dir, c4_file) -> Path:
    """A real calibrated (int8, int4-g32) and exported (cpu) tiny Llama run directory."""
    run = tmp_path_factory.mktemp("bad-inputs") / "run"
    for argv in (["calibrate", "--model", str(tiny_llama_dir), "--data",
                  c4_file, "--samples", "4",
                  "--seq-len", "32", "--sensitivity-samples", "2", "--formats",
                  "int8,int4-g32", "--device", "cpu", "--target-bits", "8", "--run", str(run)],
                 ["export", "--provider", "cpu", "--run", str(run)]):
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, res.output
    return run


PROGRESS = re.compile(r"^[^|]*\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar, e.g. Loading weights


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _damage(run: Path, how: str) -> None:
    kind, arg = how.split(":", 1)
    if kind == "corrupt":
        (run / arg).write_text("{ not json")
    elif kind == "plan-format":
        plan = json.loads((run / "plan.json").read_text())
        first = next(iter(plan["layers"]))
        plan["layers"][first]["format"] = arg
        (run / "plan.json").write_text(json.dumps(plan))


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    return [a.format(**values) if "{" in a else a for a in argv]


@pytest.mark.parametrize("case, argv, words, toml, damage", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, argv, words, toml, damage, base_run, tiny_llama_dir,
                               sample_data, c4_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base_run, tmp_path / "run")
    (tmp_path / "afile.txt").write_text("not a directory\n")
    if toml is not None:
        (tmp_path / "quantcal.toml").write_text(toml)
    if damage is not None:
        _damage(tmp_path / "run", damage)
    before = _snapshot(tmp_path)
    args = _fill(argv, {"model": str(tiny_llama_dir), "datadir": str(sample_data),
                        "data": c4_file})
    res = CliRunner().invoke(cli, args)
    lines = [line for line in res.output.splitlines()
             if line.strip() and not PROGRESS.match(line)]
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("quantcal: error: "), res.output
    assert words in lines[0], lines[0]
    assert res.stdout.strip() == "", "the error line belongs on stderr"
    assert _snapshot(tmp_path) == before, "a bad input changed files"


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert len({(tuple(c[1]), c[3], c[4]) for c in CASES}) == len(CASES)


def test_os_errors_are_one_line(tmp_path, monkeypatch):
    """A full disk (or read-only folder) ends in one line naming the file, exit 2."""
    import quantcal.evaluate.report as report

    def full(run):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.path / "report.md"))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "write_report", full)
    res = CliRunner().invoke(cli, ["report", "--run", "run"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [res.output.strip()]
    assert res.output.startswith("quantcal: error: cannot write or read")
    assert "report.md" in res.output and "free some space" in res.output


@pytest.mark.parametrize("exc, line", [
    (KeyboardInterrupt(), "quantcal: interrupted"),
    ("stage", "quantcal: interrupted; run.json was kept"),
])
def test_interrupt_says_what_was_kept(tmp_path, monkeypatch, exc, line):
    import quantcal.evaluate.report as report
    from quantcal.errors import StageInterrupted

    def interrupted(run):
        raise StageInterrupted("run.json was kept") if exc == "stage" else exc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "write_report", interrupted)
    res = CliRunner().invoke(cli, ["report", "--run", "run"])
    assert res.exit_code == 130
    assert res.output.strip() == line


def test_default_budget_out_of_reach_plans_the_least_and_says_so(base_run, tmp_path,
                                                                 monkeypatch, caplog):
    """No budget: 4.5 bits is below int4-g32 on 64-wide rows, so the plan takes the least
    these formats store, 4 + (16 + 4) / 32 bits (codes, fp16 scale, 4-bit zero point), and
    a notice names a format that would reach 4.5 (int4-g64: 4 + 20 / 64)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base_run, tmp_path / "run")
    res = CliRunner().invoke(cli, ["plan", "--run", "run", "--no-measure"])
    assert res.exit_code == 0, res.output
    budget = json.loads((tmp_path / "run" / "plan.json").read_text())["budget"]
    assert budget == {"kind": "target_bits", "value": 4 + (16 + 4) / 32}
    assert "default 4.5 bits/weight" in caplog.text and "add int4-g64" in caplog.text


def test_position_limit_is_read_from_the_graph(base_run, tmp_path, tiny_tokenizer):
    """Both exporters record the positions in the graph: Llama's rotary cache rows and
    GPT-2's learned position table, each the config's own limit (256 in tinymodels)."""
    from tinymodels import build_tiny_model, export_unquantized

    from quantcal.export.positions import model_positions

    assert model_positions(base_run / "model.onnx") == 256
    folder = tmp_path / "gpt2"
    build_tiny_model("gpt2").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    export_unquantized(folder, tmp_path / "gpt2.onnx")
    assert model_positions(tmp_path / "gpt2.onnx") == 256
    (tmp_path / "afile.txt").write_text("not a model")
    assert model_positions(tmp_path / "afile.txt") is None  # no limit known
