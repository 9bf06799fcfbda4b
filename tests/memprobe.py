"""Peak host RAM of one piece of work, measured in a fresh process by the kernel's own
count (``/proc/self/status``: VmHWM above the VmRSS taken just before it, after
``/proc/self/clear_refs`` resets the high-water mark), not by the code under test; and the
deep Llama checkpoints the memory tests compare (2 against 8 blocks, each block big enough,
12 MB in fp32, to stand above the interpreter's noise).

``MALLOC_MMAP_THRESHOLD_`` is set to 128 KiB in the probe: otherwise glibc keeps the freed
few-MB tensors of these small models in a fragmented heap, while a real model's tensors
(hundreds of MB) are mapped and returned anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 512, 1536, 8, 4, 512
MB = 1 << 20

STATUS = r'''
import json, sys
from pathlib import Path

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

def measured(fn):
    import gc
    gc.collect()
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    try:
        fn()
    finally:
        print(json.dumps({"base": base, "peak": status("VmHWM")}))
'''


def block_bytes() -> int:
    """fp32 bytes of one decoder block's weights."""
    head_dim = HIDDEN // HEADS
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    return 4 * (attention + 3 * HIDDEN * MLP + 2 * HIDDEN)


def probe(script: str, *args, timeout: int = 900) -> dict:
    """``{"base", "peak"}`` bytes from ``STATUS + ...`` run in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def deep_llama_dir(root: Path, layers: int, tokenizer) -> Path:
    """A random bf16 Llama of ``layers`` blocks of the sizes above, with ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = root / f"llama-{layers}"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
