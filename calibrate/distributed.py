"""Calibration over one host's GPUs with torch.distributed: the process group, the leader's
protocol, and the command's entry point under ``torchrun``.

``torchrun --nproc-per-node N -m -- quantcal calibrate ...`` (the ``--`` keeps torchrun from
reading ``--run`` as its ``--run-path``) starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set. :func:`calibrate_on_ranks` then joins them into one
process group (nccl on ``cuda:LOCAL_RANK``, gloo on the CPU) with a timeout
(``$QUANTCAL_DIST_TIMEOUT``, seconds), and:

- rank 0, the *leader*, runs :func:`quantcal.calibrate.api.calibrate` exactly as a single
  process does: it alone reads the data, takes the run directory's lock and writes it
  through the same staging and journalled commit (:mod:`quantcal.txn`). Where work can be
  spread (the statistics pass, exact sensitivity: :mod:`.shards`), it *publishes an op*;
- every other rank, a *follower*, loads the model and serves ops (:func:`follow`) until the
  leader says done; then all meet at a barrier and exit 0. A follower writes nothing.

An op is a JSON line the leader sets in the rendezvous store (``op/<n>``); followers poll
for it (a leader-only step may take hours: no collective waits that long) and answer
``ready/<n>/<rank>``; only then do the ranks meet in collectives, whose payload (model
state, windows, qparams) rank 0 broadcasts. Failure, from any rank, ends every rank:

- inside an op, each rank's own part runs under :func:`agree`: one all-reduce tells all
  ranks whether any failed, and the leader raises the lowest failing rank's error;
- a follower failing elsewhere sets ``failed/<rank>``, which the leader sees while it waits
  for answers; a leader failing sets a ``fail`` op;
- a rank that stops answering ends the others' collectives at the timeout.

Only the leader prints (one line, :mod:`quantcal.clierrors`); a follower that failed stays
until the leader's process has gone (one host: it watches its pid, so it never calls a store
that rank 0 hosted and took with it), so a launcher that stops every rank when one exits
cannot cut the leader's line short. ``$NCCL_NVLS_ENABLE`` defaults to 0 here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from quantcal.errors import QuantcalError, os_error_line

log = logging.getLogger(__name__)

TIMEOUT_ENV = "QUANTCAL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
POLL_S = 0.05  # how often an idle rank looks at the store
BYE_S = 10.0  # how long a failing leader waits for the followers to let go of its store
T = TypeVar("T")


@dataclass
class World:
    """This process's place in the process group, and the op and agreement counters that
    every rank advances in the same order."""

    rank: int
    size: int
    device: torch.device  # where this rank computes; collectives' tensors live here too
    store: dist.Store  # quantcal's keys, apart from the process group's
    timeout: float  # seconds
    pids: list[int]  # one host: ranks watch each other's processes, not just the store
    seq: int = 0
    agreed: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def leader_pid(self) -> int:
        return self.pids[0]


_CURRENT: World | None = None  # set by process_group(); torch's default group is global too


def current() -> World | None:
    """The world this process calibrates in, None outside torchrun (a single process)."""
    return _CURRENT


def is_writer() -> bool:
    """Whether this process may write the run directory: rank 0, or a single process."""
    return _CURRENT is None or _CURRENT.leader


def launched() -> bool:
    """Whether torchrun (or its like) started this process as one of several ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def rank_device(spec: str) -> torch.device:
    """This rank's device for ``--device spec``: ``cuda:LOCAL_RANK`` (made current) when
    ``spec`` resolves to CUDA, else the CPU. One host only."""
    from quantcal.models import resolve_device

    env = os.environ
    if env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]) != env["WORLD_SIZE"]:
        raise QuantcalError("quantcal spreads calibration over one host's GPUs; run torchrun "
                            "with --nnodes 1")
    device = resolve_device(spec)
    if device.type != "cuda":
        return torch.device("cpu")
    if device.index is not None:
        raise QuantcalError(f"--device {spec} names one GPU, but under torchrun each rank "
                            "takes cuda:LOCAL_RANK; pass --device cuda (or auto)")
    local, count = int(env.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise QuantcalError(f"LOCAL_RANK {local} has no GPU (this host has {count}); use "
                            f"torchrun --nproc-per-node {count} or less")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the ranks torchrun started (``env://``); the world is :func:`current` inside."""
    global _CURRENT
    timeout = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    span = _dt.timedelta(seconds=timeout)
    # torchrun's agent keeps one store across restarts: keys of an earlier attempt stay apart
    prefix = f"quantcal/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        raw, rank, size = next(dist.rendezvous("env://", timeout=span))
        dist.init_process_group(backend, store=dist.PrefixStore(f"{prefix}/pg", raw),
                                rank=rank, world_size=size, timeout=span,
                                device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as exc:
        raise QuantcalError(f"torch.distributed did not start ({_first_line(exc)}); launch "
                            "with torchrun --nproc-per-node N -m -- quantcal calibrate ..."
                            ) from None
    _CURRENT = World(rank, size, device, dist.PrefixStore(f"{prefix}/ops", raw), timeout,
                     pids=_pids(device, size))
    try:
        yield _CURRENT
    finally:
        _CURRENT = None
        with contextlib.suppress(Exception):  # after a failure the group may be broken
            dist.destroy_process_group()


def _pids(device: torch.device, size: int) -> list[int]:
    """Every rank's process id, from a collective: no rank has left before all have them."""
    pids = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(pids, torch.tensor([os.getpid()], dtype=torch.int64, device=device))
    return [int(p.item()) for p in pids]


def calibrate_on_ranks(config, run, **kwargs):
    """:func:`quantcal.calibrate.api.calibrate`, spread over torchrun's ranks when it started
    this process. Returns the run record (rank 0, or a single process) or None (the other
    ranks, which write nothing)."""
    from quantcal.calibrate.api import calibrate

    if not launched():
        return calibrate(config, run, **kwargs)
    device = rank_device(config.device)
    with process_group(device) as world:
        if not world.leader:
            follow(world, config)
            return None
        try:
            record = calibrate(config, run, **kwargs)
            publish(world, "done")  # a follower that failed unneeded is told here
        except BaseException:
            _publish_fail(world)
            raise
        with contact(world, "the final barrier"):
            dist.barrier()
        return record


# --- the protocol ------------------------------------------------------------------------

def publish(world: World, kind: str, **fields) -> None:
    """Leader: start op ``kind`` and wait until every follower has answered (or failed)."""
    seq = world.seq
    world.seq += 1
    world.store.set(f"op/{seq}", json.dumps({"op": kind, **fields}))
    log.debug("op %d (%s) for %d ranks", seq, kind, world.size)
    keys = [f"ready/{seq}/{r}" for r in range(1, world.size)]
    deadline = time.monotonic() + world.timeout
    while not world.store.check(keys):
        _raise_peer_failure(world)
        if time.monotonic() > deadline:
            missing = [r for r, k in enumerate(keys, 1) if not world.store.check([k])]
            raise QuantcalError(f"rank(s) {', '.join(map(str, missing))} did not answer within "
                                f"{world.timeout:g} s; raise ${TIMEOUT_ENV} if they are only "
                                "slow")
        time.sleep(POLL_S)


def next_op(world: World) -> dict:
    """Follower: wait (as long as the leader works) for the next op; answer it."""
    seq = world.seq
    key = f"op/{seq}"
    while True:
        if not _alive(world.leader_pid):  # asked first: its store may have gone with it
            raise Stopped("rank 0 has gone")
        if world.store.check([key]):
            break
        time.sleep(POLL_S)
    world.seq += 1
    op = json.loads(world.store.get(key))
    if op["op"] != "fail":
        world.store.set(f"ready/{seq}/{world.rank}", "1")
    return op


def _publish_fail(world: World) -> None:
    """Leader: say fail, and give the followers ``BYE_S`` to answer that they will not use
    the store again (rank 0 may host it: it goes when this process does)."""
    with contextlib.suppress(Exception):
        world.store.set(f"op/{world.seq}", json.dumps({"op": "fail"}))
        deadline = time.monotonic() + BYE_S
        while time.monotonic() < deadline and any(
                _alive(world.pids[r]) and not world.store.check([f"bye/{r}"])
                for r in range(1, world.size)):
            time.sleep(POLL_S)


def _raise_peer_failure(world: World) -> None:
    """A follower's own report of its failure, or one whose process has gone."""
    for r in range(1, world.size):
        if world.store.check([f"failed/{r}"]):
            raise QuantcalError(f"rank {r}: {world.store.get(f'failed/{r}').decode()}")
    gone = [str(r) for r in range(1, world.size) if not _alive(world.pids[r])]
    if gone and world.leader:
        raise QuantcalError(f"rank(s) {', '.join(gone)} ended without a word (killed? out of "
                            "host memory?); see the launcher's report")


class Stopped(QuantcalError):
    """A follower's end because some rank failed; the leader reports it."""


def agree(world: World, fn: Callable[[], T]) -> T:
    """Run this rank's part ``fn``; if any rank's part raised, every rank raises: the leader
    the lowest failing rank's error, the followers :class:`Stopped`."""
    n = world.agreed
    world.agreed += 1
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - any rank's error ends all ranks
        result, error = None, exc
        world.store.set(f"error/{n}/{world.rank}", describe(exc))
    flag = torch.tensor([world.size if error is None else world.rank], device=world.device)
    with contact(world, "an agreement"):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    if first == world.size:
        return result
    if not world.leader:
        raise Stopped(f"rank {first} failed")
    if first == 0:
        raise error
    raise QuantcalError(f"rank {first}: {world.store.get(f'error/{n}/{first}').decode()}")


@contextlib.contextmanager
def contact(world: World, what: str) -> Iterator[None]:
    """Collectives inside: a rank that failed or stopped answering becomes one line."""
    try:
        yield
    except RuntimeError as exc:
        _raise_peer_failure(world)
        raise QuantcalError(f"the ranks lost contact during {what} ({_first_line(exc)}); a "
                            "rank may have died (see the launcher's report), or raise "
                            f"${TIMEOUT_ENV} (now {world.timeout:g} s) if one is only "
                            "slow") from None


def describe(exc: BaseException) -> str:
    """One line for an error of any rank."""
    if isinstance(exc, QuantcalError):
        return _first_line(exc, whole=True)
    if isinstance(exc, OSError):
        return os_error_line(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException, whole: bool = False) -> str:
    text = str(exc).strip()
    return " ".join((text if whole else text.split("\n")[0]).split())


# --- followers ---------------------------------------------------------------------------

def follow(world: World, config) -> None:
    """Serve the leader's ops with the model ``config`` names until it says done; on any
    failure stay until the leader has reported, then raise (the CLI prints nothing here)."""
    from quantcal.calibrate.shards import HANDLERS

    _quiet()
    try:
        model = _load(config, world.device)
        while (op := next_op(world))["op"] not in ("done", "fail"):
            HANDLERS[op["op"]](world, model, op)
        if op["op"] == "done":
            with contact(world, "the final barrier"):
                dist.barrier()
            return
    except Stopped:
        pass
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the leader needs no wait for us
        _bye(world)
        raise
    except Exception as exc:  # noqa: BLE001 - told to the leader, which prints it
        if _alive(world.leader_pid):
            with contextlib.suppress(Exception):
                world.store.set(f"failed/{world.rank}", describe(exc))
    _linger(world)
    raise Stopped("stopped with the other ranks")


def _load(config, device: torch.device):
    """The model as the leader loads it (:func:`quantcal.calibrate.api.calibrate`)."""
    from quantcal.models import load_model, resolve_dtype

    model, _ = load_model(config.model, revision=config.revision,
                          dtype=resolve_dtype(config.dtype, device),
                          trust_remote_code=config.trust_remote_code,
                          device="cpu" if config.sequential else device)
    return model


def _linger(world: World) -> None:
    """Say bye (no more store calls from here), then stay until the leader's process has
    ended: it prints the error first, and a launcher that stops every rank when one exits
    must not stop it before."""
    _bye(world)
    while _alive(world.leader_pid):
        time.sleep(POLL_S)


def _bye(world: World) -> None:
    if _alive(world.leader_pid):
        with contextlib.suppress(Exception):
            world.store.set(f"bye/{world.rank}", "1")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) runs: not gone, not a zombie."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
    except OSError:  # not ours to signal, or no /proc: assume it runs
        return True


def _quiet() -> None:
    """Followers print nothing: the leader speaks for all ranks."""
    logging.getLogger("quantcal").setLevel(logging.CRITICAL)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
