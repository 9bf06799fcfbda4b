"""The ``quantcal`` command line: parses options and calls the stages; holds no logic.

Defaults may come from ``quantcal.toml`` (see :mod:`quantcal.tomlconfig`); flags win.
Every number is checked by :mod:`quantcal.cliparams` before any work; every way a command
can end badly is one line on stderr and exit status 2 (130 when interrupted), see
:mod:`quantcal.clierrors`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from quantcal import __version__
from quantcal.cliparams import (
    COUNT, POSITIVE, TARGET_BITS, Count, Device, ForceRule, Formats, Size, Tasks,
)
from quantcal.clierrors import QuantcalGroup, terminate
from quantcal.errors import QuantcalError
from quantcal.rundir import DEFAULT_RUN_DIR
from quantcal.tomlconfig import CONFIG_NAME, load_defaults

RUN_HELP = f"Run directory this stage reads and writes (default ./{DEFAULT_RUN_DIR})."


def run_option(f):
    return click.option("--run", "run", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_RUN_DIR, show_default=True, help=RUN_HELP)(f)


def budget_options(f):
    """--target-bits / --max-size / --max-kl and the --keep / --force rules."""
    opts = [
        click.option("--target-bits", type=TARGET_BITS, help="Average bits per quantizable "
                     "weight, scales and zero points counted (e.g. 4.5)."),
        click.option("--max-size", type=Size(),
                     help="Largest exported model size, e.g. 90MB or 1.2GB."),
        click.option("--max-kl", type=POSITIVE,
                     help="Largest predicted whole-model KL (nats/token; exact sensitivity "
                     "only)."),
        click.option("--keep", multiple=True, metavar="PATTERN",
                     help="Keep layers matching this glob in fp16 (repeatable), e.g. 'lm_head'."),
        click.option("--force", multiple=True, type=ForceRule(), metavar="PATTERN=FORMAT",
                     help="Force layers matching a glob to a format (repeatable), "
                     "e.g. '*.down_proj=int8'; the token embedding stays fp16 unless forced, "
                     "e.g. 'model.embed_tokens=int4-g32'."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group(cls=QuantcalGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="quantcal")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """quantcal: calibrate, plan, export and evaluate mixed-precision ONNX language models.

    \b
      quantcal calibrate --model HuggingFaceTB/SmolLM2-135M --data c4 --samples 1000
      quantcal export
      quantcal eval --tasks hellaswag,gsm8k --limit 500

    Stages meet in a run directory (./quantcal-out unless --run DIR). Options may also be
    set in ./quantcal.toml: top-level keys (e.g. model, run) apply to every command that has
    them, a [calibrate] / [export] / ... table to one command; command-line flags win.
    """
    params = {name: [p for p in cmd.params if p.name] for name, cmd in cli.commands.items()}
    ctx.default_map = load_defaults(Path.cwd() / CONFIG_NAME, params)


@cli.command()
@click.option("--model", required=True, help="Hugging Face model id or local model folder.")
@click.option("--revision", help="Model revision (branch, tag or commit) for hub ids.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="Dtype to run the model in; auto: float16 on CUDA, float32 on CPU.")
@click.option("--data", default="c4", show_default=True,
              help="Calibration text: c4 (allenai/c4 en train, streamed), wikitext2 (train), "
              "or a .txt/.json/.jsonl/.jsonl.gz/.parquet file. From $QUANTCAL_DATA_DIR, c4 "
              "is the first half of the local sample (eval scores the second half). run.json "
              "records the source and the documents used.")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in json/jsonl/parquet files.")
@click.option("--samples", type=COUNT, default=128, show_default=True,
              help="Number of calibration windows.")
@click.option("--seq-len", type=COUNT, default=512, show_default=True, help="Tokens per window.")
@click.option("--batch-size", type=COUNT, default=8, show_default=True,
              help="Windows per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for choosing windows.")
@click.option("--device", type=Device(), default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--observer", type=click.Choice(["minmax", "percentile", "mse", "entropy"]),
              default="mse", show_default=True,
              help="How activation clip ranges (w8a8 scales) are chosen from the statistics.")
@click.option("--formats", type=Formats(), default="int8,int4-g128,int4-g32",
              show_default=True,
              help="Candidate formats to compute qparams and sensitivity for "
              "(fp16, int8, int4-g32|g64|g128, w8a8).")
@click.option("--weight-method", type=click.Choice(["aware", "rtn"]), default="aware",
              show_default=True,
              help="aware: activation-aware clip search per group; rtn: plain round to "
              "nearest (the reference).")
@click.option("--hessian/--no-hessian", default=False, show_default=True,
              help="Also accumulate X^T X per layer for Hessian-aware (GPTQ) rounding.")
@click.option("--sequential", is_flag=True,
              help="Calibrate one decoder block at a time from cached block inputs "
              "(peak GPU memory: one block plus activations).")
@click.option("--sensitivity", type=click.Choice(["exact", "fast"]), default="exact",
              show_default=True,
              help="exact: KL (nats/token) of the next-token distribution with one layer "
              "quantized, one forward pass per held-out batch per layer (from its block on); "
              "fast: a Fisher proxy score, not KL, from one forward and one backward pass "
              "per held-out batch (no --max-kl).")
@click.option("--no-sensitivity", is_flag=True,
              help="Stop after the qparams: no sensitivity.json and no plan.json.")
@click.option("--sensitivity-samples", type=COUNT, default=32, show_default=True,
              help="Held-out windows (not used for calibration) that score the layers; as "
              "many others (twice this held out in all) measure the plan's KL.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run Python code shipped in the model folder or repository (auto_map in "
              "config.json); only for models whose source you trust.")
@budget_options
@click.option("--overwrite", is_flag=True,
              help="Replace a different run already in the run directory.")
@run_option
def calibrate(**opts) -> None:
    """Collect activation statistics, compute per-layer qparams, score each layer's
    sensitivity and plan a format per layer.

    Runs the model over calibration windows with forward hooks on every quantizable
    module and writes run.json, stats.safetensors and qparams.safetensors into the run
    directory; then (unless --no-sensitivity) sensitivity.json, sensitivity.png and
    plan.json for the budget (default --target-bits 4.5).
    """
    from quantcal.calibrate.api import calibrate as run_calibration, config_from_options
    from quantcal.calibrate.planner import Rules
    from quantcal.calibrate.plans import budget_from_options
    from quantcal.rundir import RunDir

    run, overwrite = RunDir(opts.pop("run")), opts.pop("overwrite")
    budget = budget_from_options(opts.pop("target_bits"), opts.pop("max_size"),
                                 opts.pop("max_kl"))
    rules = Rules.parse(opts.pop("keep"), opts.pop("force"))
    if opts.pop("no_sensitivity"):
        opts["sensitivity"] = "none"
    record = run_calibration(config_from_options(opts), run, overwrite=overwrite,
                             budget=budget, rules=rules)
    t = record.timings
    n = sum(i.kind != "embedding" for i in record.layers.values())
    click.echo(f"calibrated {n} layers on {record.config.samples} x "
               f"{record.config.seq_len} tokens in {t['total_s']:.1f} s "
               f"({t['tokens_per_s']:.0f} tok/s with hooks); wrote {run.path}/")
    if run.has("plan.json"):
        click.echo(_plan_summary(run.read_plan()))


def _plan_summary(plan) -> str:
    counts = ", ".join(f"{int(v)} {k.removeprefix('layers_')}" for k, v in plan.totals.items()
                       if k.startswith("layers_"))
    predicted = (f"KL predicted {plan.kl_predicted:.4g} nats/token" if plan.predicted_by ==
                 "exact" else f"proxy score {plan.kl_predicted:.4g} (Fisher, not KL)")
    kl = f"; {predicted}" + ("" if plan.kl_measured is None else (
        f", KL measured {plan.kl_measured:.4g} nats/token on {plan.measure_windows} held-out "
        "windows that scored nothing"))
    return (f"plan ({plan.budget.kind} {plan.budget.value:g}): {counts}; "
            f"{plan.totals['bits_per_weight']:.3f} bits/weight, predicted size "
            f"{plan.predicted_size_bytes / 1e6:.1f} MB (fp16, --provider cuda) / "
            f"{plan.predicted_size_fp32_bytes / 1e6:.1f} MB (fp32, --provider cpu){kl}")


@cli.command()
@budget_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the plan (default: RUN/plan.json).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Measure the new plan's whole-model KL on the held-out windows (loads "
              "the model again).")
@click.option("--data", help="Where to read the held-out windows for --measure (default: "
              "the source run.json records, e.g. when the data folder has moved).")
@run_option
def plan(**opts) -> None:
    """Choose a format per layer under a budget, from an existing run directory.

    Reads sensitivity.json and run.json (no layer is re-scored), solves the plan exactly
    and writes plan.json (default budget: --target-bits 4.5).
    """
    from quantcal.calibrate.analysis import replan
    from quantcal.calibrate.planner import Rules
    from quantcal.calibrate.plans import budget_from_options
    from quantcal.rundir import RunDir

    budget = budget_from_options(opts["target_bits"], opts["max_size"], opts["max_kl"])
    new = replan(RunDir(opts["run"]), budget=budget,
                 rules=Rules.parse(opts["keep"], opts["force"]), output=opts["output"],
                 measure=opts["measure"], data=opts["data"])
    click.echo(_plan_summary(new))


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan to export (default: RUN/plan.json); hand-edited plans are checked.")
@click.option("--provider", type=click.Choice(["cuda", "cpu"]), default="cuda",
              show_default=True,
              help="Target execution provider: cuda exports fp16 activations, cpu fp32.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model path (default: RUN/model.onnx).")
@run_option
def export(**opts) -> None:
    """Write the mixed-precision ONNX model (with KV cache) and verify it.

    Reads run.json, qparams.safetensors and plan.json; writes model.onnx (+ .onnx.data)
    and export.json with the parity figures (logits against torch with the same
    fake-quant, greedy decoding with the KV cache against recomputation).
    """
    from quantcal.export.api import export_onnx
    from quantcal.rundir import RunDir

    out = export_onnx(RunDir(opts["run"]), plan_path=opts["plan_path"],
                      provider=opts["provider"], output=opts["output"])
    p = out.parity
    ops = ", ".join(f"{v} {k}" for k, v in sorted(out.ops.items()))
    click.echo(f"wrote {out.path} ({out.file_bytes / 1e6:.1f} MB, {out.dtype}; {ops}); "
               f"logits max abs error {p['logits_max_abs']:.2e} (tolerance "
               f"{p['tolerance']:.1e}), greedy decoding with KV cache matches recomputation"
               + (f" ({p['greedy_near_ties']:.0f} near-tie step(s))"
                  if p.get("greedy_near_ties") else ""))


@cli.command()
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=COUNT, default=64, show_default=True)
@click.option("--model", "model_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Exported model (default: RUN/model.onnx).")
@click.option("--tokenizer", help="Tokenizer folder or id (default: the run's model).")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="auto: CUDA when it works, else CPU (with a notice).")
@run_option
def generate(**opts) -> None:
    """Greedy generation with an exported model (KV cache kept on the device)."""
    from quantcal.export.generate import generate_text
    from quantcal.rundir import RunDir

    text, figures = generate_text(RunDir(opts["run"]), opts["prompt"],
                                  model_path=opts["model_path"], tokenizer=opts["tokenizer"],
                                  max_new_tokens=opts["max_new_tokens"],
                                  provider=opts["provider"])
    click.echo(opts["prompt"] + text)
    click.echo(f"[{figures['new_tokens']} tokens on {figures['provider']}, "
               f"{figures['tokens_per_s']:.1f} tok/s]", err=True)


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--tasks", type=Tasks(), default="hellaswag,gsm8k,wikitext2", show_default=True,
              help="Comma-separated: hellaswag, gsm8k, wikitext2, c4.")
@click.option("--limit", type=COUNT, help="Score the first N documents of each task.")
@click.option("--sample", type=COUNT, help="Score a random subset of N documents (see --seed).")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed for --sample.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True,
              help="onnxruntime provider (auto: cuda when it works, else cpu).")
@click.option("--device", type=Device(), default="cpu", show_default=True,
              help="Device of torch backends (the source model, the baseline).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--seq-len", type=Count(2), help="Perplexity window (default 2048, or the model's "
              "limit if smaller).")
@click.option("--stride", type=COUNT, help="Perplexity stride (default: --seq-len, disjoint "
              "windows).")
@click.option("--baseline", is_flag=True,
              help="Also evaluate the source FP model (torch) the same way, side by side.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local folder laid out like shared/data (or set $QUANTCAL_DATA_DIR).")
@click.option("--allow-overlap", is_flag=True,
              help="Score perplexity text that calibration read (refused by default); "
              "eval.json records how many documents overlap.")
@run_option
def eval_(**opts) -> None:
    """Score a model on HellaSwag, GSM8K and perplexity; write eval.json.

    MODEL is a Hugging Face id or folder (torch backend) or an .onnx file or run
    directory (onnxruntime backend); without it, the run directory's model.onnx.
    HellaSwag and GSM8K follow lm-evaluation-harness (acc/acc_norm; 5-shot GSM8K with
    strict-match and flexible-extract); perplexity uses sliding windows.
    """
    from quantcal.evaluate.api import evaluate
    from quantcal.evaluate.evaluator import format_results
    from quantcal.rundir import RunDir

    if opts["stride"] and opts["seq_len"] and opts["stride"] > opts["seq_len"]:
        raise QuantcalError(f"--stride {opts['stride']} is longer than --seq-len "
                            f"{opts['seq_len']}: windows would skip tokens; pass --stride "
                            f"{opts['seq_len']} or less")
    record = evaluate(opts["model"], RunDir(opts["run"]), list(opts["tasks"]),
                      limit=opts["limit"],
                      sample=opts["sample"], seed=opts["seed"], provider=opts["provider"],
                      data_dir=opts["data_dir"], baseline=opts["baseline"],
                      device=opts["device"], batch_size=opts["batch_size"],
                      seq_len=opts["seq_len"], stride=opts["stride"],
                      allow_overlap=opts["allow_overlap"])
    click.echo(format_results(record))


@cli.command()
@click.argument("target", required=False)
@click.option("--model", help="bench calibrate: hub id or local folder of the model.")
@click.option("--shape", type=click.Choice(["smollm2-135m", "llama-3.2-1b"]),
              help="bench calibrate: a random-weight model of this real shape instead.")
@click.option("--samples", type=COUNT, default=32, show_default=True,
              help="bench calibrate: number of windows.")
@click.option("--seq-len", type=COUNT, default=512, show_default=True,
              help="bench calibrate: tokens per window.")
@click.option("--batch-size", type=COUNT, default=8, show_default=True,
              help="Windows per forward pass (calibrate) or sequences (model).")
@click.option("--device", type=Device(), default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--baseline", "baselines", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="bench MODEL: other exports to measure side by side (e.g. the fp16 one).")
@click.option("--prompt-len", type=COUNT, default=1024, show_default=True,
              help="bench MODEL: prompt length for prefill tokens/s.")
@click.option("--new-tokens", type=COUNT, default=128, show_default=True,
              help="bench MODEL: greedy steps for decode tokens/s.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="bench MODEL: onnxruntime provider.")
@run_option
def bench(target, as_json, baselines, prompt_len, new_tokens, provider, **opts) -> None:
    """Measure speed. TARGET is `calibrate` (statistic-hook overhead against a plain
    forward pass, calibration tokens/s) or an exported .onnx model (prefill and decode
    tokens/s, peak memory, size; --baseline adds other exports side by side). Without
    TARGET: the run directory's model.onnx."""
    import json

    if target == "calibrate":
        from quantcal.calibrate.bench import format_bench, run_bench_calibrate

        opts.pop("run")
        result = run_bench_calibrate(**opts)
        click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
        return
    from quantcal.evaluate.speed import bench_model, format_model_bench
    from quantcal.rundir import MODEL, RunDir

    models = [Path(target) if target else RunDir(opts["run"]).require(MODEL), *baselines]
    rows = [bench_model(m, provider=provider, batch=opts["batch_size"], prompt_len=prompt_len,
                        new_tokens=new_tokens) for m in models]
    click.echo(json.dumps(rows, indent=2) if as_json else format_model_bench(rows))


@cli.command()
@run_option
def report(**opts) -> None:
    """Turn a run directory into report.md with plots (plan, sensitivity, accuracy vs size)."""
    from quantcal.evaluate.report import write_report
    from quantcal.rundir import REPORT, RunDir

    run = RunDir(opts["run"])
    write_report(run)
    click.echo(f"wrote {run.file(REPORT)}")


def main() -> None:
    signal.signal(signal.SIGTERM, terminate)
    cli(prog_name="quantcal")


if __name__ == "__main__":
    sys.exit(main())
