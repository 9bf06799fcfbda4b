"""Tiny models and a tiny tokenizer for tests, built from configs (nothing downloads)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "gpt2")


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (about a second on 300 documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_config(family: str, vocab_size: int = 512):
    """A config of ``family`` small enough for CPU tests, with GQA where the family has it."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
        )
    raise ValueError(family)


def build_tiny_model(family: str, seed: int = 0, vocab_size: int = 512):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    return model.eval()


def export_unquantized(model_dir, path, dtype=None):
    """Export the model in ``model_dir`` to ``path`` with every layer fp16 (no qparams) and
    activations in ``dtype`` (default float32); returns the loaded model."""
    import numpy as np

    from quantcal.export.api import BUILDERS
    from quantcal.export.builder import save_model
    from quantcal.formats import FP16
    from quantcal.models import family_of, load_model, quantizable_layers

    model, _ = load_model(str(model_dir))
    formats = {n: FP16() for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    graph = BUILDERS[family_of(model).name](model, formats, {}, dtype or np.float32).model()
    save_model(graph, path)
    _record_unverified(path, model_dir, dtype or np.float32)
    return model


def _record_unverified(path, model_dir, dtype) -> None:
    """An export record for a test model built without ``quantcal export``: consumers
    (backends, bench, generate) refuse models without one. The tests that use these models
    compare them with torch themselves; ``parity`` stays empty to say quantcal did not."""
    from pathlib import Path

    import numpy as np

    from quantcal.provenance import ExportRecord, onnx_digests, record_path
    from quantcal.rundir import atomic_write_json

    path = Path(path)
    files = onnx_digests(path)
    atomic_write_json(record_path(path), ExportRecord(
        model=str(model_dir), provider="cpu", dtype=np.dtype(dtype).name, path=path.name,
        file_bytes=sum((path.parent / n).stat().st_size for n in files), passed=True,
        files=files))
