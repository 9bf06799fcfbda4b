"""The ``quantcal`` command line: parses options and calls the stages; holds no logic.

Here: the group and the stages that write a run (``calibrate``, ``plan``, ``export``); the
commands that run an export or read a run live in :mod:`quantcal.clirun`. Defaults may come
from ``quantcal.toml`` (see :mod:`quantcal.tomlconfig`); flags win. Every number is checked
by :mod:`quantcal.cliparams` before any work; every way a command can end badly is one line
on stderr and exit status 2 (130 when interrupted), see :mod:`quantcal.clierrors`; ``-q`` /
``-v`` set what else is printed (:mod:`quantcal.clioutput`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from quantcal import __version__
from quantcal.cliparams import (
    COUNT, NON_NEGATIVE, POSITIVE, TARGET_BITS, ForceRule, Formats, Size, device_option,
    dtype_option, run_option,
)
from quantcal.clierrors import QuantcalGroup, terminate
from quantcal.clioutput import configure, shows_progress, verbosity_options
from quantcal.clirun import COMMANDS
from quantcal.tomlconfig import CONFIG_NAME, load_defaults

# on rows that pad int4-g128 (SmolLM2: 576 = 4.5 x 128) the cheapest of int8, int4-g128 and
# int4-g32 stores 4.51 bits/weight, above the default 4.5: int4-g64 (4.32) leaves room to plan
DEFAULT_FORMATS = "int8,int4-g128,int4-g64,int4-g32"


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
@verbosity_options
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
    -q / -v (before or after the command) print less or more.
    """
    configure(ctx)
    params = {name: [p for p in cmd.params if p.name] for name, cmd in cli.commands.items()}
    ctx.default_map = load_defaults(Path.cwd() / CONFIG_NAME, params)


for _command in COMMANDS:
    cli.add_command(_command)


@cli.command()
@click.option("--model", required=True, help="Hugging Face model id or local model folder.")
@click.option("--revision", help="Model revision (branch, tag or commit) for hub ids.")
@dtype_option("Dtype to run the model in; auto: float16 on CUDA, float32 on CPU.")
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
@device_option()
@click.option("--observer", type=click.Choice(["minmax", "percentile", "mse", "entropy"]),
              default="mse", show_default=True,
              help="How activation clip ranges (w8a8 scales) are chosen from the statistics.")
@click.option("--formats", type=Formats(), default=DEFAULT_FORMATS, show_default=True,
              help="Candidate formats to compute qparams and sensitivity for "
              "(fp16, int8, int4-g32|g64|g128, w8a8); int4-g64 lets the default 4.5 "
              "bits/weight choose between formats on hidden sizes such as 576.")
@click.option("--weight-method", type=click.Choice(["aware", "rtn"]), default="aware",
              show_default=True,
              help="aware: activation-aware clip search per group; rtn: plain round to "
              "nearest (the reference).")
@click.option("--hessian/--no-hessian", default=False, show_default=True,
              help="Round the int4/int8 candidates with GPTQ, block by block as GPTQ does: "
              "each block's Hessians (X^T X / n, one per group of layers fed one input) are "
              "taken on the outputs of the layers and blocks already quantized (in the "
              "cheapest candidate format of each layer), used and freed, one block on the "
              "device at a time; group ranges are set as the columns are quantized (clip "
              "search under --weight-method aware, min/max under rtn). stats.safetensors "
              "holds no Hessian.")
@click.option("--act-order", is_flag=True,
              help="With --hessian: quantize the columns by descending Hessian diagonal "
              "(GPTQ's act-order); group ranges are then fixed before rounding on the "
              "original column groups (static groups), as MatMulNBits stores them.")
@click.option("--awq", is_flag=True,
              help="Activation-aware scaling (AWQ) first: per block, search per-input-channel "
              "scales that minimise each layer group's output error when rounded to the "
              "coarsest int4/int8 candidate, and fold them into the preceding norm or "
              "linear (no op added); qparams.safetensors keeps them for export.")
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
@verbosity_options
def calibrate(**opts) -> None:
    """Collect activation statistics, compute per-layer qparams, score each layer's
    sensitivity and plan a format per layer.

    Runs the model over calibration windows with forward hooks on every quantizable
    module and writes run.json, stats.safetensors and qparams.safetensors into the run
    directory; then (unless --no-sensitivity) sensitivity.json, sensitivity.png and
    plan.json for the budget (default --target-bits 4.5).
    """
    from quantcal.calibrate.api import config_from_options
    from quantcal.calibrate.distributed import calibrate_on_ranks as run_calibration
    from quantcal.calibrate.planner import Rules
    from quantcal.calibrate.plans import budget_from_options
    from quantcal.resources import describe as describe_peaks
    from quantcal.rundir import RunDir

    run, overwrite = RunDir(opts.pop("run")), opts.pop("overwrite")
    budget = budget_from_options(opts.pop("target_bits"), opts.pop("max_size"),
                                 opts.pop("max_kl"))
    rules = Rules.parse(opts.pop("keep"), opts.pop("force"))
    if opts.pop("no_sensitivity"):
        opts["sensitivity"] = "none"
    record = run_calibration(config_from_options(opts), run, overwrite=overwrite,
                             budget=budget, rules=rules, progress=shows_progress())
    if record is None:  # a rank of torchrun other than 0: rank 0 reports for all
        return
    t = record.timings
    n = sum(i.kind != "embedding" for i in record.layers.values())
    click.echo(f"calibrated {n} layers on {record.config.samples} x "
               f"{record.config.seq_len} tokens in {t['total_s']:.1f} s "
               f"({t['tokens_per_s']:.0f} tok/s with hooks; {describe_peaks(t)}); "
               f"wrote {run.path}/")
    if run.has("plan.json"):
        click.echo(_plan_summary(run.read_plan()))


def _plan_summary(plan) -> str:
    from quantcal.calibrate.uniform import comparison

    counts = ", ".join(f"{int(v)} {k.removeprefix('layers_')}" for k, v in plan.totals.items()
                       if k.startswith("layers_"))
    predicted = (f"KL predicted {plan.kl_predicted:.4g} nats/token" if plan.predicted_by ==
                 "exact" else f"proxy score {plan.kl_predicted:.4g} (Fisher, not KL)")
    kl = f"; {predicted}" + ("" if plan.kl_measured is None else (
        f", KL measured {plan.kl_measured:.4g} nats/token on {plan.measure_windows} held-out "
        "windows that scored nothing" + comparison(plan)))
    speed = "" if plan.predicted_tok_s is None or plan.speed is None else (
        f", predicted decode {plan.predicted_tok_s:.0f} tok/s at batch 1 "
        f"({plan.speed.fused_groups} of {plan.speed.groups} q/k/v groups fused; "
        f"latency table: {plan.speed.table})")
    return (f"plan ({plan.budget.kind} {plan.budget.value:g}): {counts}; "
            f"{plan.totals['bits_per_weight']:.3f} bits/weight, predicted size "
            f"{plan.predicted_size_bytes / 1e6:.1f} MB (fp16, --provider cuda) / "
            f"{plan.predicted_size_fp32_bytes / 1e6:.1f} MB (fp32, --provider cpu){speed}{kl}")


@cli.command()
@budget_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the plan (default: RUN/plan.json).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Measure the new plan's whole-model KL on the held-out windows (loads "
              "the model again).")
@click.option("--data", help="Where to read the held-out windows for --measure (default: "
              "the source run.json records, e.g. when the data folder has moved).")
@click.option("--latency-table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel latencies that predict decode tok/s (from `quantcal bench "
              "kernels`; default: the H100 table shipped with quantcal).")
@click.option("--min-tok-s", type=POSITIVE, help="Least predicted decode tokens/s at batch 1 "
              "(a constraint of the same exact program).")
@click.option("--prefer-fusable", type=NON_NEGATIVE, metavar="TOL",
              help="Prefer plans whose q/k/v of a block share a format (one fused node each) "
              "while the predicted KL stays within TOL nats/token of the optimum.")
@run_option
@verbosity_options
def plan(**opts) -> None:
    """Choose a format per layer under a budget, from an existing run directory.

    Reads sensitivity.json and run.json (no layer is re-scored), solves the plan exactly
    and writes plan.json (default budget: --target-bits 4.5).
    """
    from quantcal.calibrate.analysis import replan
    from quantcal.calibrate.planner import Rules
    from quantcal.calibrate.plans import budget_from_options
    from quantcal.calibrate.speed import speed_options
    from quantcal.rundir import RunDir

    budget = budget_from_options(opts["target_bits"], opts["max_size"], opts["max_kl"])
    speed = speed_options(opts["latency_table"], opts["min_tok_s"], opts["prefer_fusable"])
    new = replan(RunDir(opts["run"]), budget=budget,
                 rules=Rules.parse(opts["keep"], opts["force"]), output=opts["output"],
                 measure=opts["measure"], data=opts["data"], progress=shows_progress(),
                 speed=speed)
    click.echo(_plan_summary(new))


@cli.command()
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan to export (default: RUN/plan.json); hand-edited plans are checked.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True,
              help="Target execution provider: cuda exports fp16 activations, cpu fp32; "
              "auto: cuda when it works here, else cpu (with a notice).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model path (default: RUN/model.onnx).")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="Emit a block's q/k/v as one node where they share a format, fed packed "
              "to GroupQueryAttention (export.json lists them under fused); --no-fuse keeps "
              "one node per layer.")
@click.option("--fuse-mlp/--no-fuse-mlp", default=False, show_default=True,
              help="With --fuse, also emit gate/up as one node and split its output (on an "
              "H100 the Split costs what the fused node saves in decoding, and more in "
              "prefill).")
@run_option
@verbosity_options
def export(**opts) -> None:
    """Write the mixed-precision ONNX model (with KV cache) and verify it.

    Reads run.json, qparams.safetensors and plan.json; writes model.onnx (+ .onnx.data)
    and export.json with the parity figures (logits against torch with the same
    fake-quant, greedy decoding with the KV cache against recomputation).
    """
    from quantcal.export.api import export_onnx
    from quantcal.export.fusion import ALL_KINDS
    from quantcal.resources import describe as describe_peaks
    from quantcal.rundir import RunDir

    out = export_onnx(RunDir(opts["run"]), plan_path=opts["plan_path"],
                      provider=opts["provider"], output=opts["output"],
                      fuse=(ALL_KINDS if opts["fuse_mlp"] else True) if opts["fuse"] else False)
    p = out.parity
    ops = ", ".join(f"{v} {k}" for k, v in sorted(out.ops.items()))
    click.echo(f"wrote {out.path} ({out.file_bytes / 1e6:.1f} MB, {out.dtype}; {ops}); "
               f"logits max abs error {p['logits_max_abs']:.2e} (tolerance "
               f"{p['tolerance']:.1e}), greedy decoding with KV cache matches recomputation"
               + (f" ({p['greedy_near_ties']:.0f} near-tie step(s))"
                  if p.get("greedy_near_ties") else "")
               + f"; {describe_peaks(out.timings)}")


def main() -> None:
    signal.signal(signal.SIGTERM, terminate)
    cli(prog_name="quantcal")


if __name__ == "__main__":
    sys.exit(main())
