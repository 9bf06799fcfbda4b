"""``load_model(low_memory=True)``: the decoder blocks stay in the memory-mapped checkpoint
until a forward (or ``block_weights``) needs them, and the model is the one
``from_pretrained`` loads, to the bit.

The memory test runs in fresh Python processes that measure themselves (``VmRSS`` before
loading, ``VmHWM`` after a forward pass, the high-water mark reset by writing 5 to
``/proc/self/clear_refs``), independently of quantcal's own peak figures: tiny Llama models
of 2 and 8 blocks (hidden 512, MLP 1536: 12.6 MB of fp32 weights a block), bfloat16 on disk
and float32 in memory; loading and a forward may grow by one block's fp32 bytes between
them. The probe pins glibc's mmap threshold at its 128 KiB default, so these few-MB tensors
are mapped and unmapped as a real model's (hundreds of MB) are, not kept in a fragmented
heap (tests/export/test_export_memory.py says more).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from quantcal.errors import QuantcalError
from quantcal.lazymodel import store_of
from quantcal.models import (
    block_weights, blocks_of, family_of, held_blocks, load_model, to_device_,
)
from tinymodels import ALL_FAMILIES, build_tiny_model

from memprobe import MB, STATUS, block_bytes, deep_llama_dir, probe

_PROBE = STATUS + r'''
import torch
from quantcal.models import load_model

def load_and_run():
    model, _ = load_model(sys.argv[1], low_memory=True)
    with torch.inference_mode():
        model(torch.arange(32)[None] % 512, use_cache=False)

measured(load_and_run)
'''


def _save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lazy_model_is_the_loaded_one(family, tmp_path, tiny_tokenizer):
    model = build_tiny_model(family)
    folder = _save(model.to(torch.bfloat16) if family == "llama" else model, tmp_path / "m",
                   tiny_tokenizer)
    whole, _ = load_model(str(folder))
    lazy, _ = load_model(str(folder), low_memory=True)
    assert {p.device.type for p in blocks_of(lazy, family_of(lazy)).parameters()} == {"meta"}
    with block_weights(lazy, *range(lazy.config.num_hidden_layers)):
        ours = dict(lazy.named_parameters(remove_duplicate=False))
        theirs = dict(whole.named_parameters(remove_duplicate=False))
        assert ours.keys() == theirs.keys()
        for name, param in theirs.items():
            assert ours[name].dtype == param.dtype and torch.equal(ours[name], param), name
        buffers = dict(whole.named_buffers())
        for name, buf in lazy.named_buffers():
            assert torch.equal(buf, buffers[name]), name
    head, emb = lazy.get_output_embeddings(), lazy.get_input_embeddings()
    assert (head.weight is emb.weight) == (whole.get_output_embeddings().weight
                                           is whole.get_input_embeddings().weight)
    assert lazy.config.to_dict() == whole.config.to_dict()
    assert lazy.generation_config.to_dict() == whole.generation_config.to_dict()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(lazy(ids).logits, whole(ids).logits)
    assert store_of(lazy).held() == []


def test_forward_holds_one_block_at_a_time(tmp_path, tiny_tokenizer):
    folder = _save(build_tiny_model("llama"), tmp_path / "m", tiny_tokenizer)
    model, _ = load_model(str(folder), low_memory=True)
    store, seen = store_of(model), []
    for block in model.model.layers:
        block.register_forward_hook(lambda m, a, o: seen.append(store.held()), prepend=True)
    with torch.inference_mode():
        model(torch.arange(8)[None])
    assert seen == [[0], [1]] and store.held() == []
    with held_blocks(model) as hold:
        hold(0, 1)
        assert store.held() == [0, 1]
        hold(1, 2)  # block 2 does not exist
        assert store.held() == [1]
        assert model.model.layers[1].mlp.up_proj.weight.device.type == "cpu"
    assert model.model.layers[1].mlp.up_proj.weight.is_meta


def test_a_damaged_block_is_refused_when_read(tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    folder = _save(model, tmp_path / "m", tiny_tokenizer)
    lazy, _ = load_model(str(folder), low_memory=True)  # blocks are read when needed
    with block_weights(lazy, 0):
        pass
    with pytest.raises(QuantcalError, match=r"model\.layers\.1\.mlp\.down_proj\.weight \(NaN\)"):
        with block_weights(lazy, 1):
            pass
    assert store_of(lazy).held() == [] and lazy.model.layers[1].mlp.down_proj.weight.is_meta


def test_cached_hub_id_loads_lazily(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_llama_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lazy, tokenizer = load_model("acme/tiny", low_memory=True)
    whole, _ = load_model(str(tiny_llama_dir))
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert torch.equal(lazy(ids).logits, whole(ids).logits)
    assert tokenizer.eos_token


def test_load_and_forward_peak_does_not_grow_with_depth(tmp_path, tiny_tokenizer):
    grew = {}
    for layers in (2, 8):
        figures = probe(_PROBE, deep_llama_dir(tmp_path, layers, tiny_tokenizer), timeout=600)
        grew[layers] = figures["peak"] - figures["base"]
    block = block_bytes()
    print(f"\nload + forward growth above baseline (MB): "
          f"{ {n: round(g / MB, 1) for n, g in grew.items()} }; one block {block / MB:.1f}")
    assert grew[8] - grew[2] <= block


def test_a_lazy_model_moves_and_reads_its_blocks_there(tmp_path, tiny_tokenizer):
    """``to_device_`` moves what lies outside the blocks and sends every block read there
    (the meta device stands in for a GPU here: a tensor put there keeps no data)."""
    folder = _save(build_tiny_model("qwen2"), tmp_path / "m", tiny_tokenizer)
    model, _ = load_model(str(folder), low_memory=True)
    with block_weights(model, 1):
        with pytest.raises(RuntimeError, match="held"):
            to_device_(model, "meta")
    assert to_device_(model, "meta") is model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    with block_weights(model, 1):
        weight = model.model.layers[1].mlp.up_proj.weight
        assert weight.is_meta and store_of(model).held() == [1]
