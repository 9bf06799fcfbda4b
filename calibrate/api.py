"""``calibrate``: the stage's one entry point.

Reads a model (hub id or folder) and calibration text; writes ``stats.safetensors``,
``qparams.safetensors``, ``sensitivity.json`` (+ ``.png``), ``plan.json`` and ``run.json``
into the run directory as one transaction (:mod:`quantcal.txn`): everything is written into
``RUN/.staging/calibrate/`` and promoted only when complete, under the run directory's lock.
With ``--hessian`` the statistics pass collects no X^T X: the qparams step runs GPTQ block
by block (:mod:`quantcal.calibrate.gptq`), each block's Hessians built from the outputs of
the already-quantized earlier blocks and freed with it, one block on the device at a time.
Each finished step (statistics, qparams, sensitivity) is a checkpoint there, so an
interrupted or failed run leaves the previous run's files untouched, and re-running the same
command on the same model resumes from the last finished step. ``run.json`` records the
digests of the model's files and of the statistics and qparams it describes.

Memory: with ``--sequential`` the model is loaded with its decoder blocks left in the
memory-mapped checkpoint (``load_model(low_memory=True)``, :mod:`quantcal.lazymodel`; the
whole model where accelerate is missing), and every step up to the qparams holds one block
at a time, in host RAM and on the device: AWQ's search (its folds made again whenever a
block is read), the statistics pass, GPTQ, and the qparams (one layer's weight at a time,
read through its block). Sensitivity and the plan's measurements run whole-model forwards:
they are the one step that holds the whole model, on the device (:func:`materialize_`);
with ``--sensitivity none`` it is never held whole.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import platform
import shutil
import time
from dataclasses import replace

import torch

from quantcal import __version__
from quantcal.calibrate.analysis import (
    HELD_OUT_SETS, SENSITIVITY_PNG, measured, score, split_held_out, write_plan,
    write_sensitivity,
)
from quantcal.calibrate.awq import awq_step_
from quantcal.calibrate.collect import collect_full, collect_sequential
from quantcal.calibrate.shards import sharded
from quantcal.calibrate.gptq import gptq_formats, gptq_qparams
from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import check_budget, make_plan
from quantcal.calibrate.data import read_calibration
from quantcal.calibrate.qparams import (
    QPARAMS_KIND, compute_embedding_qparams, compute_qparams, layer_weights,
)
from quantcal.calibrate.stats import STAT_KIND, stats_from_tensors, stats_to_tensors
from quantcal.calibrate.uniform import rivals
from quantcal.config import Budget, CalibrateConfig, RunRecord, SensitivityRecord
from quantcal.errors import QuantcalError, StageInterrupted
from quantcal.formats import BlockQuant
from quantcal.lazymodel import materialize_
from quantcal.models import (
    load_model, max_positions, quantizable_layers, resolve_device, resolve_dtype,
)
from quantcal.provenance import model_digests, sha256_file
from quantcal.resources import peak_figures, start_stage
from quantcal.rundir import (
    EVAL_JSON, EXPORT_JSON, MODEL, PLAN, QPARAMS, REPORT, RUN_JSON, SENSITIVITY, STATS, RunDir,
    load_tensors, read_record, save_tensors, atomic_write_json,
)
from quantcal.txn import Stage

log = logging.getLogger(__name__)
DOWNSTREAM = (SENSITIVITY, SENSITIVITY_PNG, PLAN, MODEL, MODEL + ".data", EXPORT_JSON,
              EVAL_JSON, REPORT, "accuracy_vs_size.png")
CHECKPOINT = "checkpoint.json"


def check_run_dir(run: RunDir, config: CalibrateConfig, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding a different calibration needs ``--overwrite``."""
    if run.path.exists() and not run.path.is_dir():
        raise QuantcalError(f"--run {run.path} is a file, not a directory; choose another path")
    if not run.has(RUN_JSON) or overwrite:
        return
    try:
        previous = read_record(run.file(RUN_JSON), RunRecord).config
    except QuantcalError:
        raise QuantcalError(f"{run.path} holds a run.json this quantcal cannot read; pass "
                            "--overwrite to replace it or choose another --run") from None
    if previous != config:
        diff = [f for f in config.__dataclass_fields__
                if getattr(previous, f) != getattr(config, f)]
        raise QuantcalError(
            f"{run.path} already holds a different run (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it, or choose another --run"
        )


def _versions() -> dict[str, str]:
    import transformers

    return {"quantcal": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class Checkpoint:
    """The calibration's staging folder: finished steps kept for a resumed run.

    ``checkpoint.json`` names the config and model digests the steps belong to; a run with
    another config or changed model files starts over."""

    def __init__(self, run: RunDir, config: CalibrateConfig, model_files: dict[str, str]):
        self.stage = Stage(run.path, "calibrate", resume=True)
        self.key = {"config": config.to_dict(), "model_files": model_files}
        self.state = {**self.key, "done": [], "timings": {}}
        path = self.stage.file(CHECKPOINT)
        try:
            old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            old = None
        if old is not None and {k: old.get(k) for k in self.key} == self.key:
            self.state = old
        else:
            shutil.rmtree(self.stage.dir)
            self.stage.dir.mkdir(parents=True)

    def done(self, step: str) -> bool:
        return step in self.state["done"]

    def mark(self, step: str, timings: dict[str, float]) -> None:
        self.state["done"].append(step)
        self.state["timings"].update(timings)
        atomic_write_json(self.stage.file(CHECKPOINT), self.state)

    def kept(self) -> str:
        if not self.state["done"]:
            return "nothing was kept"
        return (f"its finished steps ({', '.join(self.state['done'])}) are kept in "
                f"{self.stage.dir}: run the same command again to resume")


def calibrate(config: CalibrateConfig, run: RunDir, *, overwrite: bool = False,
              budget: Budget | None = None, rules: Rules = Rules(),
              progress: bool = True) -> RunRecord:
    """Collect statistics and qparams for ``config.model`` and commit them into ``run``;
    unless ``config.sensitivity`` is ``none``, also score every layer and plan for
    ``budget`` (None: about 4.5 bits per weight, see ``plans.default_budget``) under
    ``rules``.

    Returns:
        The ``run.json`` record written.
    """
    check_run_dir(run, config, overwrite)
    if config.hessian:
        gptq_formats(config.formats)  # refuse before loading anything
    start_stage()
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = _load(config, dtype, device)
    limit = max_positions(model)
    if limit is not None and config.seq_len > limit:
        raise QuantcalError(f"--seq-len {config.seq_len} is longer than the model allows "
                            f"({limit} positions); use --seq-len {limit} or less")
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    windows, held_out, data_source = read_calibration(
        config.data, tokenizer, seq_len=config.seq_len, samples=config.samples,
        seed=config.seed, holdout=HELD_OUT_SETS * config.sensitivity_samples
        if config.sensitivity != "none" else 0, text_field=config.text_field)
    timings = {"load_s": load_s, "data_s": time.perf_counter() - t}
    layers = quantizable_layers(model)
    shape_only = RunRecord(config=config, layers=layers, **_outside_bytes(model, layers),
                           model_files=model_digests(config.model, config.revision),
                           data_source=data_source)
    if config.sensitivity != "none":  # an impossible budget or rule fails now
        check_budget(shape_only, budget, rules)
    created = not run.path.exists()
    ckpt = None
    try:
        with run.lock("calibrate"):
            check_run_dir(run, config, overwrite)  # another run may have landed meanwhile
            ckpt = Checkpoint(run, config, shape_only.model_files)
            record = _steps(ckpt, run, model, shape_only, windows, held_out, budget, rules,
                            device, timings, t0, progress)
            _commit(ckpt.stage, run, record)
    except KeyboardInterrupt:
        raise StageInterrupted(f"the run directory {run.path} keeps its previous files; "
                               + (ckpt.kept() if ckpt else "nothing was kept")) from None
    finally:
        if ckpt is not None and not ckpt.state["done"]:
            ckpt.stage.discard()
        if created and run.path.is_dir() and not any(
                p.name not in (".lock",) for p in run.path.iterdir()):
            shutil.rmtree(run.path, ignore_errors=True)
    return record


def _load(config: CalibrateConfig, dtype: torch.dtype, device: torch.device):
    """The model and tokenizer: with ``--sequential`` on the CPU, its decoder blocks left in
    the memory-mapped checkpoint and read one at a time by each step when accelerate is
    installed (else loaded whole, on the CPU); without it, whole on ``device``."""
    low_memory = config.sequential and importlib.util.find_spec("accelerate") is not None
    if config.sequential and not low_memory:
        log.warning("quantcal: accelerate is not installed, so --sequential loads the whole "
                    "model into host memory; pip install accelerate to load it block by block")
    return load_model(config.model, revision=config.revision, dtype=dtype,
                      trust_remote_code=config.trust_remote_code,
                      device="cpu" if config.sequential else device, low_memory=low_memory)


def _steps(ckpt: Checkpoint, run: RunDir, model, record: RunRecord, windows, held_out,
           budget, rules, device, timings, t0, progress) -> RunRecord:
    """Statistics, qparams, sensitivity and plan into the staging folder, each finished
    step checkpointed; returns the run.json record (written last)."""
    config, folder = record.config, ckpt.stage.dir
    layers = record.layers
    modules = {n: model.get_submodule(n) for n, i in layers.items() if i.kind != "embedding"}
    meta = {"model": config.model, "observer": config.observer,
            "weight_method": config.weight_method,
            "formats": ",".join(f.name for f in config.formats)}
    # --awq: scales searched and folded into the model before anything is measured (awq.py)
    awq_scales = awq_step_(ckpt, model, windows, config, device, progress) if config.awq else {}
    if ckpt.done("stats"):
        stats = stats_from_tensors(load_tensors(folder / STATS, STAT_KIND)[0], device)
    else:
        # under torchrun the batches are spread over the ranks (shards.py): same statistics
        collect = sharded(collect_sequential if config.sequential else collect_full)
        t = time.perf_counter()
        stats = collect(model, windows, modules, batch_size=config.batch_size, device=device,
                        progress=progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats_s = time.perf_counter() - t
        save_tensors(folder / STATS, stats_to_tensors(stats), kind=STAT_KIND, metadata=meta)
        ckpt.mark("stats", {"stats_s": stats_s,
                            "tokens_per_s": windows.numel() / max(stats_s, 1e-9)})
    if ckpt.done("qparams"):
        qparams = {k: v.to(device) for k, v in
                   load_tensors(folder / QPARAMS, QPARAMS_KIND)[0].items()}
    else:
        t = time.perf_counter()
        qparams = _qparams(model, modules, layers, stats, windows, config, device, progress)
        qparams.update(awq_scales)  # {layer}/awq/scale: export folds them in again
        save_tensors(folder / QPARAMS, qparams, kind=QPARAMS_KIND, metadata=meta)
        ckpt.mark("qparams", {"qparams_s": time.perf_counter() - t})
    made_from = {QPARAMS: sha256_file(folder / QPARAMS)}
    record = replace(record, versions=_versions(),
                     files={STATS: sha256_file(folder / STATS), **made_from},
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if config.sensitivity != "none":
        t = time.perf_counter()
        materialize_(model, device)  # the one step that holds the whole model (on device)
        score_on, measure_on = split_held_out(held_out, config.sensitivity_samples)
        if ckpt.done("sensitivity"):
            sens = read_record(folder / SENSITIVITY, SensitivityRecord)
        else:
            sens = replace(score(model, record, stats, qparams, score_on, device=device,
                                 progress=progress), made_from=made_from)
            write_sensitivity(folder, sens)
            ckpt.mark("sensitivity", {})
        plan = replace(make_plan(record, sens, budget, rules), made_from=made_from)
        plan = measured(plan, model, qparams, measure_on, batch_size=config.batch_size,
                        device=device, rival_plans=rivals(record, sens, plan, rules))
        write_plan(folder, sens, plan)
        timings["sensitivity_plan_s"] = time.perf_counter() - t
    timings = {**ckpt.state["timings"], **timings, **peak_figures(),
               "total_s": time.perf_counter() - t0}
    record = replace(record, timings=timings)
    atomic_write_json(folder / RUN_JSON, record)
    return record


def _qparams(model, modules, layers, stats, windows, config: CalibrateConfig, device,
             progress) -> dict[str, torch.Tensor]:
    """Every layer's qparams for every candidate: with ``--hessian`` the block formats' by
    block-by-block GPTQ, the rest (w8a8, activations, the embedding) from the statistics,
    one weight on the device at a time."""
    formats = config.formats
    qparams: dict[str, torch.Tensor] = {}
    if config.hessian:
        qparams.update(gptq_qparams(model, windows, modules, formats,
                                    batch_size=config.batch_size, device=device,
                                    method=config.weight_method, act_order=config.act_order,
                                    progress=progress))
        formats = tuple(f for f in formats if not isinstance(f, BlockQuant))
    with layer_weights(model, modules) as weights:  # one at a time, through held blocks
        qparams.update(compute_qparams(weights, stats, formats, observer=config.observer,
                                       method=config.weight_method, progress=progress,
                                       device=device))
    tables = {n: model.get_submodule(n).weight.detach()
              for n, i in layers.items() if i.kind == "embedding"}
    qparams.update(compute_embedding_qparams(tables, config.formats,
                                             method=config.weight_method, device=device))
    return qparams


def _commit(stage: Stage, run: RunDir, record: RunRecord) -> None:
    """Promote the new run; files made from other qparams (plan, export, eval) go."""
    try:
        previous = read_record(run.file(RUN_JSON), RunRecord).files.get(QPARAMS)
    except QuantcalError:
        previous = None
    stale = DOWNSTREAM if previous != record.files[QPARAMS] else ()
    stage.commit([STATS, QPARAMS, SENSITIVITY, SENSITIVITY_PNG, PLAN, RUN_JSON], remove=stale)


def _outside_bytes(model, layers) -> dict:
    """fp16 bytes of the parameters besides the linear layers (the embedding table among
    them, which a plan may quantize), and whether the head is tied."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    planned = sum(i.in_features * i.out_features for n, i in layers.items()
                  if i.kind != "embedding" and not (tied and n == "lm_head"))
    total = sum(p.numel() for p in model.parameters())
    return {"other_param_bytes": 2 * (total - planned), "tied_lm_head": tied}


def config_from_options(opts: dict) -> CalibrateConfig:
    """Build the config from CLI options (``formats`` as a comma-separated string)."""
    from quantcal.formats import parse_formats

    keys = set(CalibrateConfig.__dataclass_fields__)
    fields = {k: v for k, v in opts.items() if k in keys and v is not None}
    if isinstance(fields.get("formats"), str):
        fields["formats"] = parse_formats(fields["formats"])
    return replace(CalibrateConfig(model=fields.pop("model")), **fields)
