"""Hook statistics against a hook-free reference; sequential equals full; hooks removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tinymodels import build_tiny_model
from quantcal.calibrate.collect import collect_full, collect_sequential
from quantcal.calibrate.histogram import hist_edges
from quantcal.calibrate.stats import (
    HIST_ROWS, hist_stride, stats_from_tensors, stats_to_tensors,
)
from quantcal.models import quantizable_layers

FAMILIES = ("llama", "qwen2", "gpt2")


class _Recorder(nn.Module):
    """Replaces a module (no hook API) and keeps every input and output it sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.inputs, self.outputs = inner, [], []

    def forward(self, x):
        y = self.inner(x)
        self.inputs.append(x.detach().clone())
        self.outputs.append(y.detach().clone())
        return y


def _reference(model, windows, names, batch_size):
    recorders = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        recorders[name] = _Recorder(getattr(owner, attr))
        setattr(owner, attr, recorders[name])
    with torch.no_grad():
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for name, rec in recorders.items():  # restore
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, rec.inner)
    out = {}
    for name, rec in recorders.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec.inputs]).double().numpy()
        y = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec.outputs]).double().numpy()
        out[name] = (x, y)
    return out


def _modules(model):
    layers = quantizable_layers(model)
    return {n: model.get_submodule(n) for n, i in layers.items() if i.kind != "embedding"}


@pytest.mark.parametrize("family, seq, batch", [
    ("llama", 24, 4), ("qwen2", 24, 4), ("gpt2", 24, 4),
    ("llama", 100, 4),  # 400 tokens a call: the histogram takes every 4th token
])
def test_stats_equal_hook_free_reference(family, seq, batch):
    model = build_tiny_model(family)
    windows = torch.randint(0, 512, (6, seq), generator=torch.Generator().manual_seed(1))
    modules = _modules(model)
    stats = collect_full(model, windows, modules, batch_size=batch, device=torch.device("cpu"),
                         hessian=True, progress=False)
    ref = _reference(model, windows, list(modules), batch_size=batch)
    edges = hist_edges().numpy()
    for name, (x, y) in ref.items():
        s = stats[name]
        assert s.tokens == x.shape[0] == windows.numel()
        np.testing.assert_allclose(s.min.numpy(), x.min(0), rtol=1e-6)
        np.testing.assert_allclose(s.max.numpy(), x.max(0), rtol=1e-6)
        np.testing.assert_allclose(s.sum_abs.numpy(), np.abs(x).sum(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.sum_sq.numpy(), (x ** 2).sum(0), rtol=1e-4, atol=1e-5)
        y_calls = np.split(y, np.cumsum([b.numel() for b in windows.split(batch)])[:-1])
        y_rows = np.concatenate([c[:: hist_stride(c.shape[0])] for c in y_calls])
        np.testing.assert_allclose(s.out_absmax.numpy(), np.abs(y_rows).max(0), rtol=1e-6)
        np.testing.assert_allclose(s.xtx.numpy(), x.T @ x, rtol=1e-4, atol=1e-4)
        # histogram: counts of |x| per log2 bin, split by sign (interior bins compared).
        # The hook bins with fp32 log2, so a value within ~1e-6 of an edge may land in the
        # neighbouring bin: allow 0.1% of values to move (each move changes the L1 by 2).
        # the histogram sees every k-th token of each call (k = hist_stride)
        sizes = [b.numel() for b in windows.split(batch)]
        per_call = np.split(x, np.cumsum(sizes)[:-1])
        rows = np.concatenate([c[:: hist_stride(c.shape[0])] for c in per_call])
        flat = rows.reshape(-1).astype(np.float32)
        pos, _ = np.histogram(flat[flat > 0], bins=edges)
        neg, _ = np.histogram(-flat[flat < 0], bins=edges)
        assert s.hist_pos.sum() + s.hist_neg.sum() == flat.size
        assert (flat.size < x.size) == (seq * batch > HIST_ROWS)
        assert np.abs(s.hist_pos.numpy()[1:-1] - pos[1:-1]).sum() <= 2 * 1e-3 * flat.size
        assert np.abs(s.hist_neg.numpy()[1:-1] - neg[1:-1]).sum() <= 2 * 1e-3 * flat.size


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_equals_full(family):
    windows = torch.randint(0, 512, (5, 20), generator=torch.Generator().manual_seed(2))
    full_model = build_tiny_model(family)
    full = collect_full(full_model, windows, _modules(full_model), batch_size=2,
                        device=torch.device("cpu"), hessian=True, progress=False)
    seq_model = build_tiny_model(family)
    seq = collect_sequential(seq_model, windows, _modules(seq_model), batch_size=2,
                             device=torch.device("cpu"), progress=False)
    assert full.keys() == seq.keys()
    a, b = stats_to_tensors(full), stats_to_tensors(seq)
    for key in a:
        torch.testing.assert_close(b[key].double(), a[key].double(), rtol=1e-5, atol=1e-5,
                                   msg=key)
    # the model is intact after sequential calibration
    with torch.no_grad():
        torch.testing.assert_close(seq_model(windows).logits, full_model(windows).logits)


def test_hooks_removed_on_error():
    model = build_tiny_model("llama")
    modules = _modules(model)
    bad = torch.full((2, 8), 10_000)  # token ids past the vocabulary: embedding fails
    with pytest.raises(IndexError):
        collect_full(model, bad, modules, batch_size=2, device=torch.device("cpu"),
                     progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_stats_round_trip_through_tensors():
    model = build_tiny_model("gpt2")
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = collect_full(model, windows, _modules(model), batch_size=2,
                         device=torch.device("cpu"), progress=False)
    back = stats_from_tensors(stats_to_tensors(stats))
    assert back.keys() == stats.keys()
    name = next(iter(stats))
    assert back[name].tokens == stats[name].tokens
    assert torch.equal(back[name].hist_pos, stats[name].hist_pos)
    assert "transformer.h.0.attn.c_attn" in stats  # GPT-2's Conv1D is found


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_replay_equals_eager(family):
    """The graphed calibration pass gives the eager pass's statistics, with no host sync."""
    device = torch.device("cuda")
    model = build_tiny_model(family).to(device)
    windows = torch.randint(0, 512, (10, 32), generator=torch.Generator().manual_seed(4))
    modules = _modules(model)
    eager = collect_full(model, windows, modules, batch_size=3, device=device, hessian=True,
                         progress=False, cuda_graph=False)
    graphed = collect_full(model, windows, modules, batch_size=3, device=device, hessian=True,
                           progress=False, cuda_graph=True)
    a, b = stats_to_tensors(eager), stats_to_tensors(graphed)
    for key in a:
        if "/hist_" in key:
            # while capturing, transformers materialises the causal mask instead of using
            # SDPA's is_causal path: activations differ in the last bits, so a value next to
            # a bin edge may change bins. Totals must match and almost every count too.
            assert float(a[key].sum()) == float(b[key].sum())
            assert float((a[key] - b[key]).abs().sum()) <= 2e-3 * float(a[key].sum()), key
        else:
            torch.testing.assert_close(b[key].double(), a[key].double(), rtol=1e-3, atol=1e-4,
                                       msg=key)


def test_no_hessian_reaches_the_stats_file_and_aliases_share_one():
    """An X^T X collected for one-layer use is shared by q/k/v (one tensor, not clones) and
    is never part of the stats.safetensors layout, nor read back from an older file's."""
    model = build_tiny_model("llama")
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = collect_full(model, windows, _modules(model), batch_size=2,
                         device=torch.device("cpu"), hessian=True, progress=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.xtx is not None and k.xtx is q.xtx and v.xtx is q.xtx
    tensors = stats_to_tensors(stats)
    assert not [key for key in tensors if key.endswith("/xtx")]
    tensors["model.layers.0.self_attn.q_proj/xtx"] = q.xtx  # as an older quantcal wrote
    assert stats_from_tensors(tensors)["model.layers.0.self_attn.q_proj"].xtx is None


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sequential_equals_full_with_sliding_and_global_layers(family):
    """Gemma 2/3 pass sliding and global layers their own masks (and Gemma 3 its own rotary
    tables): windows longer than the sliding window (16) make them differ, and each block
    must get its own from the activation cache, not the first block's."""
    windows = torch.randint(0, 512, (4, 40), generator=torch.Generator().manual_seed(3))
    full_model, seq_model = build_tiny_model(family), build_tiny_model(family)
    full = collect_full(full_model, windows, _modules(full_model), batch_size=2,
                        device=torch.device("cpu"), progress=False)
    seq = collect_sequential(seq_model, windows, _modules(seq_model), batch_size=2,
                             device=torch.device("cpu"), progress=False)
    a, b = stats_to_tensors(full), stats_to_tensors(seq)
    for key in a:
        torch.testing.assert_close(b[key].double(), a[key].double(), rtol=1e-5, atol=1e-5,
                                   msg=key)
