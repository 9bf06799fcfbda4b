"""What each rank computes under torchrun, and how the parts merge into exactly the single
process's result (:mod:`.distributed` runs the ops).

Statistics (op ``collect``): the calibration batches (``windows.split(batch_size)``, as the
single process cuts them) are divided into contiguous shards, one per rank
(:func:`shard`); each rank runs the very driver the leader uses (:mod:`.collect`) *one batch
at a time*, so every hook sees the same tensors as in the single process and the histogram's
token subsample (one per hook call) is the same. The histograms' bins are fixed
(:mod:`.histogram`: no range grows with the data), so no range need be agreed first. Then:

- order-free fields merge by one all-reduce each: min, max and per-output max |y| (min/max),
  the histograms (float64 counts of whole numbers: exact in any order) and token counts;
- the float32 running sums (sum |x|, sum x^2; X^T X when asked) depend on the order of the
  additions, so each rank keeps its batches' sums apart and they are added along a chain:
  rank r receives rank r-1's running total, adds its batches in order, passes it on; the
  last rank broadcasts it. The additions are the single process's, one by one: the result
  is the same bit for bit. It costs one vector of the sums per rank boundary.

Exact sensitivity (op ``exact``): a layer's KL sums depend on that layer only
(:func:`quantcal.calibrate.sensitivity.kl_sums`), so the layers are divided between the
ranks by estimated cost (:func:`assign`: blocks run from the layer to the head), every rank
scores its own on all held-out windows, and the rows are gathered: the same numbers.

Before either, rank 0 broadcasts the model's parameters and buffers (an ``--awq`` run has
folded scales into them), the windows and, for sensitivity, the qparams. The rest of the
stage (AWQ's search, qparams and GPTQ, the Fisher proxy, the plan and its measured KL) runs
on rank 0 alone, as in one process.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from quantcal.calibrate.distributed import World, agree, contact, current, publish
from quantcal.calibrate.stats import LayerStats, new_stats
from quantcal.errors import QuantcalError

Collect = Callable[..., dict[str, LayerStats]]
ORDERED = ("sum_abs", "sum_sq")  # float32 running sums: merged along the chain
BUCKET_BYTES = 256 << 20  # largest piece broadcast at once


def shard(n: int, size: int, rank: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items; the first ``n % size`` take one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def sharded(collect: Collect) -> Collect:
    """``collect`` itself in a single process; under torchrun the same function spread over
    the ranks (rank 0 calls it; the others serve the op)."""
    if current() is None:
        return collect

    def run(model: nn.Module, windows: torch.Tensor, modules: dict[str, nn.Module], *,
            batch_size: int, device: torch.device, progress: bool = True,
            hessian: bool = False) -> dict[str, LayerStats]:
        world = current()
        publish(world, "collect", driver=collect.__name__, batch_size=batch_size,
                windows=tensor_meta({"w": windows})["w"], modules=list(modules),
                hessian=hessian)
        return _collect_op(world, model, windows, modules, collect, batch_size, hessian,
                           progress)
    return run


def _follow_collect(world: World, model: nn.Module, op: dict) -> None:
    from quantcal.calibrate import collect as drivers

    fn = {"collect_full": drivers.collect_full,
          "collect_sequential": drivers.collect_sequential}[op["driver"]]
    windows = empty_like_meta({"w": op["windows"]}, torch.device("cpu"))["w"]
    modules = {n: model.get_submodule(n) for n in op["modules"]}
    _collect_op(world, model, windows, modules, fn, op["batch_size"], op["hessian"], False)


def _collect_op(world: World, model: nn.Module, windows: torch.Tensor,
                modules: dict[str, nn.Module], collect: Collect, batch_size: int,
                hessian: bool, progress: bool) -> dict[str, LayerStats]:
    broadcast_model_(world, model)
    broadcast_(world, [windows])
    batches = windows.split(batch_size)  # each (B, L), as the single process cuts them
    mine = shard(len(batches), world.size, world.rank)
    acc, deltas = agree(world, lambda: _collect_part(
        collect, model, batches, mine, modules, world.device, hessian, progress))
    return _merge(world, acc, deltas)


def _collect_part(collect: Collect, model: nn.Module, batches, mine: range,
                  modules: dict[str, nn.Module], device: torch.device, hessian: bool,
                  progress: bool) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """This rank's batches, one driver call each: the order-free fields folded together,
    each batch's running sums kept apart (flat, in the order of :func:`_ordered`)."""
    acc = new_stats(modules, device, hessian)  # min +inf, max -inf, zeros: merge identities
    deltas: list[torch.Tensor] = []
    extra = {"hessian": True} if hessian else {}
    with tqdm(total=sum(batches[k].numel() for k in mine), desc="calibrate", unit="tok",
              unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        for k in mine:
            try:
                part = collect(model, batches[k], modules, batch_size=batches[k].shape[0],
                               device=device, progress=False, **extra)
            except QuantcalError as exc:  # name the batch as the single process does
                text = str(exc).replace("in batch 1 of 1", f"in batch {k + 1} of {len(batches)}")
                raise QuantcalError(text) from None
            _fold_unordered_(acc, part)
            deltas.append(torch.cat([t.reshape(-1) for t in _ordered(part)]))
            bar.update(batches[k].numel())
    return acc, deltas


def _ordered(stats: dict[str, LayerStats]) -> list[torch.Tensor]:
    """The fields whose sum depends on the order of additions, layer by layer."""
    out = []
    for s in stats.values():
        out += [getattr(s, f) for f in ORDERED] + ([s.xtx] if s.xtx is not None else [])
    return out


def _fold_unordered_(acc: dict[str, LayerStats], part: dict[str, LayerStats]) -> None:
    for name, a in acc.items():
        p = part[name]
        torch.minimum(a.min, p.min, out=a.min)
        torch.maximum(a.max, p.max, out=a.max)
        torch.maximum(a.out_absmax, p.out_absmax, out=a.out_absmax)
        a.hist_pos += p.hist_pos
        a.hist_neg += p.hist_neg
        a.tokens += p.tokens


def _merge(world: World, acc: dict[str, LayerStats], deltas: list[torch.Tensor]
           ) -> dict[str, LayerStats]:
    """Every rank's part into ``acc``: what one process would have on every rank."""
    stats = list(acc.values())
    groups = {dist.ReduceOp.MIN: ["min"], dist.ReduceOp.MAX: ["max", "out_absmax"],
              dist.ReduceOp.SUM: ["hist_pos", "hist_neg"]}
    tokens = torch.tensor([s.tokens for s in stats], dtype=torch.int64, device=world.device)
    with contact(world, "the statistics' reduction"):
        for op, fields in groups.items():
            _all_reduce_into_(op, [getattr(s, f) for f in fields for s in stats])
        dist.all_reduce(tokens)
        running = _chain(world, deltas, sum(t.numel() for t in _ordered(acc)))
    for s, n in zip(stats, tokens.tolist()):
        s.tokens = int(n)
    start = 0
    for t in _ordered(acc):
        t.copy_(running[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return acc


def _all_reduce_into_(op, tensors: list[torch.Tensor]) -> None:
    """One all-reduce over ``tensors`` (one dtype), results written back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op)
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()


def _chain(world: World, deltas: list[torch.Tensor], n: int) -> torch.Tensor:
    """The single process's running sum: zeros, plus every batch's sums in batch order."""
    device = deltas[0].device if deltas else world.device
    running = torch.zeros(n, dtype=torch.float32, device=device)
    if world.rank > 0:
        dist.recv(running, src=world.rank - 1)
    for d in deltas:
        running += d
    if world.rank < world.size - 1:
        dist.send(running, dst=world.rank + 1)
    dist.broadcast(running, src=world.size - 1)
    return running


# --- what travels -----------------------------------------------------------------------

def broadcast_(world: World, tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into the same-shaped ``tensors`` of every other rank, in place (on
    any device), in buckets of one dtype sent as bytes (so any dtype travels)."""
    order = sorted(range(len(tensors)), key=lambda i: str(tensors[i].dtype))  # stable
    bucket: list[torch.Tensor] = []
    for i in order:
        t = tensors[i]
        if bucket and (t.dtype != bucket[0].dtype or
                       sum(b.nbytes for b in bucket) + t.nbytes > BUCKET_BYTES):
            _broadcast_bucket(world, bucket)
            bucket = []
        if t.numel():
            bucket.append(t)
    if bucket:
        _broadcast_bucket(world, bucket)


def _broadcast_bucket(world: World, bucket: list[torch.Tensor]) -> None:
    if world.leader:
        flat = torch.cat([t.detach().reshape(-1).to(world.device) for t in bucket])
    else:
        flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype,
                           device=world.device)
    with contact(world, "a broadcast"):
        dist.broadcast(flat.view(torch.uint8), src=0)
    if world.leader:
        return
    with torch.inference_mode():  # in place also into tensors made in inference mode
        start = 0
        for t in bucket:
            t.copy_(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()


def broadcast_model_(world: World, model: nn.Module) -> None:
    """Rank 0's parameters and buffers (as folded by ``--awq``, say) into every rank's."""
    broadcast_(world, [p.detach() for p in model.parameters()] + list(model.buffers()))


def tensor_meta(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """``{name: [dtype, shape]}``, for an op: the followers allocate from it."""
    return {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}


def empty_like_meta(meta: dict[str, list], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            for k, (dtype, shape) in meta.items()}


# --- exact sensitivity -------------------------------------------------------------------

def layer_costs(model: nn.Module, blocks: Mapping[str, int | None]) -> list[float]:
    """Relative cost of scoring each layer: the weights its trials run through (its block
    to the last, then the head)."""
    from quantcal.models import blocks_of, family_of

    family = family_of(model)
    stack = blocks_of(model, family)
    per_block = sum(p.numel() for p in stack[0].parameters()) if len(stack) else 0
    head = model.get_submodule(family.lm_head).weight.numel()
    return [float((len(stack) - b) * per_block if b is not None else 0) + head
            for b in blocks.values()]


def assign(costs: list[float], size: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least loaded rank (lowest on a
    tie): deterministic, and within the largest item of an even split."""
    load, owner = [0.0] * size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def lead_exact(world: World, model: nn.Module, held_out: torch.Tensor,
               blocks: Mapping[str, int | None], formats, qparams: Mapping[str, torch.Tensor],
               *, batch_size: int, device: torch.device, progress: bool = True
               ) -> dict[str, torch.Tensor]:
    """Rank 0's side of :func:`quantcal.calibrate.sensitivity.kl_sums` over all ranks."""
    owners = dict(zip(blocks, assign(layer_costs(model, blocks), world.size)))
    qparams = dict(qparams)
    publish(world, "exact", held_out=tensor_meta({"h": held_out})["h"], blocks=dict(blocks),
            formats=[f.name for f in formats], batch_size=batch_size, owners=owners,
            qparams=tensor_meta(qparams))
    return _exact_op(world, model, held_out, dict(blocks), formats, qparams, owners,
                     batch_size, progress)


def _follow_exact(world: World, model: nn.Module, op: dict) -> None:
    from quantcal.formats import parse_formats

    model.to(world.device)  # as the leader's calibrate does before scoring
    held_out = empty_like_meta({"h": op["held_out"]}, torch.device("cpu"))["h"]
    qparams = empty_like_meta(op["qparams"], world.device)
    _exact_op(world, model, held_out, op["blocks"], parse_formats(",".join(op["formats"])),
              qparams, op["owners"], op["batch_size"], False)


def _exact_op(world: World, model: nn.Module, held_out: torch.Tensor,
              blocks: dict[str, int | None], formats, qparams: dict[str, torch.Tensor],
              owners: dict[str, int], batch_size: int, progress: bool
              ) -> dict[str, torch.Tensor]:
    from quantcal.calibrate.sensitivity import kl_sums

    broadcast_model_(world, model)
    broadcast_(world, [held_out, *qparams.values()])
    mine = {n: b for n, b in blocks.items() if owners[n] == world.rank}
    part = agree(world, lambda: kl_sums(model, held_out, mine, formats, qparams,
                                        batch_size=batch_size, device=world.device,
                                        progress=progress))
    rows = torch.stack([part[n] if n in part else torch.zeros(len(formats), device=world.device)
                        for n in blocks])  # (layers, formats)
    gathered = [torch.empty_like(rows) for _ in range(world.size)]
    with contact(world, "gathering the sensitivity scores"):
        dist.all_gather(gathered, rows)
    return {n: gathered[owners[n]][i] for i, n in enumerate(blocks)}


HANDLERS: dict[str, Callable[[World, nn.Module, dict], None]] = {
    "collect": _follow_collect, "exact": _follow_exact,
}
