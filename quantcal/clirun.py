"""The commands that run an exported model or read what the others wrote: ``generate``,
``eval``, ``bench`` and ``report``. Like :mod:`quantcal.cli`, they parse and call; every
number is checked by :mod:`quantcal.cliparams` first. Option names follow the tools users
come from: ``generate`` takes Hugging Face ``generate``'s sampling options, ``eval``
lm-evaluation-harness's (``--num-fewshot`` or ``--num_fewshot``, ``--output`` or
``--output_path``, ``--log-samples`` or ``--log_samples``).
"""

from __future__ import annotations

from pathlib import Path

import click

from quantcal.cliparams import (
    COUNT, NON_NEGATIVE, PROBABILITY, Count, Tasks, device_option, dtype_option, run_option,
)
from quantcal.clierrors import QuantcalCommand
from quantcal.clioutput import shows_progress, verbosity_options
from quantcal.errors import QuantcalError

PROVIDER = click.Choice(["auto", "cuda", "cpu"])


@click.command(cls=QuantcalCommand)
@click.option("--prompt", required=True, help="Text to continue (with --chat: the message "
              "to answer).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template "
              "as one user message (Instruct models) and print only the reply.")
@click.option("--max-new-tokens", type=COUNT, default=64, show_default=True)
@click.option("--temperature", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="0: greedy; above 0: sample from softmax(logits / T).")
@click.option("--top-k", type=Count(0), default=0, show_default=True,
              help="Sample among the K most likely tokens only (0: all).")
@click.option("--top-p", type=PROBABILITY, default=1.0, show_default=True,
              help="Sample among the most likely tokens whose probability reaches P.")
@click.option("--seed", type=int, help="Seed for sampling: the same seed, the same text.")
@click.option("--model", "model_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Exported model (default: RUN/model.onnx).")
@click.option("--tokenizer", help="Tokenizer folder or id (default: the run's model).")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True,
              help="auto: CUDA when it works, else CPU (with a notice); cuda: CUDA or an "
              "error.")
@run_option
@verbosity_options
def generate(**opts) -> None:
    """Generate text with an exported model (KV cache kept on the device): greedy, or
    sampled with --temperature (and --top-k / --top-p, as Hugging Face generate)."""
    from quantcal.export.generate import generate_text
    from quantcal.rundir import RunDir
    from quantcal.sampling import Sampling

    sampling = Sampling(opts["temperature"], opts["top_k"], opts["top_p"], opts["seed"])
    text, figures = generate_text(RunDir(opts["run"]), opts["prompt"],
                                  model_path=opts["model_path"], tokenizer=opts["tokenizer"],
                                  max_new_tokens=opts["max_new_tokens"],
                                  provider=opts["provider"], chat=opts["chat"],
                                  sampling=sampling)
    click.echo(text if opts["chat"] else opts["prompt"] + text)
    if shows_progress():
        click.echo(f"[{figures['new_tokens']} tokens on {figures['provider']}, "
                   f"{figures['tokens_per_s']:.1f} tok/s]", err=True)


@click.command(name="eval", cls=QuantcalCommand)
@click.argument("model", required=False)
@click.option("--tasks", type=Tasks(), default="hellaswag,gsm8k,wikitext2", show_default=True,
              help="Comma-separated: hellaswag, gsm8k, wikitext2, c4.")
@click.option("--num-fewshot", "--num_fewshot", "num_fewshot", type=Count(0),
              help="Exemplars per document for hellaswag and gsm8k (default: 0 and 5, "
              "lm-eval's).")
@click.option("--limit", type=COUNT, help="Score the first N documents of each task.")
@click.option("--sample", type=COUNT, help="Score a random subset of N documents (see --seed).")
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed for --sample.")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True,
              help="onnxruntime provider (auto: cuda when it works, else cpu).")
@device_option("Device of torch backends (the source model, the baseline): auto is "
               "cuda when available.")
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
@click.option("-o", "--output", "--output-path", "--output_path", "output",
              type=click.Path(path_type=Path),
              help="Also write the results as lm-eval does: a .json file, or a folder "
              "(then FOLDER/results.json).")
@click.option("--log-samples", "--log_samples", "log_samples", is_flag=True,
              help="With --output: each document's requests, answers and scores, one JSON "
              "line each, in samples_<task>.jsonl beside the results.")
@run_option
@verbosity_options
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
    model, run, tasks = opts.pop("model"), RunDir(opts.pop("run")), list(opts.pop("tasks"))
    record = evaluate(model, run, tasks, progress=shows_progress(), **opts)
    click.echo(format_results(record))


@click.command(cls=QuantcalCommand)
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
@device_option()
@dtype_option()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--baseline", "baselines", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="bench MODEL: other exports to measure side by side (e.g. the fp16 one).")
@click.option("--prompt-len", type=COUNT, default=1024, show_default=True,
              help="bench MODEL: prompt length for prefill tokens/s.")
@click.option("--new-tokens", type=COUNT, default=128, show_default=True,
              help="bench MODEL: greedy steps for decode tokens/s.")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True,
              help="bench MODEL and kernels: onnxruntime provider.")
@click.option("--kernel-shape", "kernel_shapes", multiple=True, metavar="NxK|N+N+NxK",
              help="bench kernels: a projection (e.g. 4096x4096) or a group timed as separate "
              "nodes and fused (e.g. 4096+1024+1024x4096); repeatable. Default: the "
              "--model-shapes projections.")
@click.option("--model-shapes", default="llama-3.2-1b,llama-3.1-8b", show_default=True,
              help="bench kernels: models whose projections (and q/k/v, gate/up groups) to "
              "time.")
@click.option("--kernel-formats", help="bench kernels: comma-separated, e.g. "
              "fp16,int4-g16-sym,int8 (default: fp16, int4 with blocks 16 to 128 and int8 "
              "with blocks 32 and 128, each symmetric and not).")
@click.option("--layouts", help="bench kernels: comma-separated among matmul, plain, fpa_intb, "
              "prepacked, prepacked-sm90 (default: all the provider has).")
@click.option("--m", "m_values", default="1,8,64,1024", show_default=True,
              help="bench kernels: comma-separated rows of the activation (M).")
@click.option("--repeats", type=COUNT, default=20, show_default=True,
              help="bench kernels: samples per entry (each 10 runs back to back).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="bench kernels: where to write the latency table (default: the user cache, "
              "~/.cache/quantcal/kernels-DEVICE-ortVERSION.json).")
@run_option
@verbosity_options
def bench(target, as_json, baselines, prompt_len, new_tokens, provider, **opts) -> None:
    """Measure speed. TARGET is `calibrate` (statistic-hook overhead against a plain
    forward pass, calibration tokens/s), `kernels` (one-node MatMul / MatMulNBits latency
    per format, layout, shape and M: a latency table for `quantcal plan --latency-table`)
    or an exported .onnx model (prefill and decode tokens/s, peak memory, size; --baseline
    adds other exports side by side). Without TARGET: the run directory's model.onnx."""
    import json

    kernel_opts = {k: opts.pop(k) for k in ("kernel_shapes", "model_shapes", "kernel_formats",
                                            "layouts", "m_values", "repeats", "output")}
    if target == "kernels":
        from quantcal.evaluate.kernels import format_kernels, run_bench_kernels

        table, path = run_bench_kernels(provider=provider, progress=shows_progress(),
                                        **kernel_opts)
        click.echo(json.dumps(table.to_dict(), indent=2) if as_json else format_kernels(table))
        click.echo(f"wrote {path}", err=True)
        return
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


@click.command(cls=QuantcalCommand)
@run_option
@verbosity_options
def report(**opts) -> None:
    """Turn a run directory into report.md with plots (plan, sensitivity, accuracy vs size)."""
    from quantcal.evaluate.report import write_report
    from quantcal.rundir import REPORT, RunDir

    run = RunDir(opts["run"])
    write_report(run)
    click.echo(f"wrote {run.file(REPORT)}")


COMMANDS = (generate, eval_, bench, report)
