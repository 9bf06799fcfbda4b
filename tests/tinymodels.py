"""Tiny models and a tiny tokenizer for tests, built from configs (nothing downloads), and
an onnxruntime session of an exported decoder (:class:`OnnxDecoder`)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "gpt2")  # the families every parametrized test runs on
# every family quantcal exports, each with its distinctive features switched on; the long
# prompts of tests/export/test_families.py cross their windows and original rope lengths
ALL_FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
                "gpt2")
WINDOW = 16  # sliding window of the tiny Mistral, Gemma 2/3 (and Phi-3's is 2 * WINDOW)
ORIGINAL_POSITIONS = 32  # original_max_position_embeddings of llama3 and phi3 rope scaling


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


def load_tiny_tokenizer(path):
    """The tokenizer :func:`build_tiny_tokenizer` made, read back from its tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)),
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _new_configs(family: str, vocab_size: int):
    """Configs of the families added with the family registry (None for the others)."""
    from transformers import (
        Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen3Config,
    )

    base = dict(vocab_size=vocab_size, **_SMALL, **_IDS)
    if family == "llama3":
        return LlamaConfig(**base, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=ORIGINAL_POSITIONS))
    if family == "qwen3":  # head_dim 32 != hidden / heads
        return Qwen3Config(**base, head_dim=32, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**base, sliding_window=WINDOW, tie_word_embeddings=False)
    gemma = dict(base, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":
        return Gemma2Config(**gemma, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3":  # layer 0 local (rope base 10k), layer 1 global (1M, linear x2)
        return Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={
                                    "sliding_attention": dict(rope_type="default",
                                                              rope_theta=10000.0),
                                    "full_attention": dict(rope_type="linear", factor=2.0,
                                                           rope_theta=1000000.0)})
    if family == "phi3":
        half = 64 // 4 // 2
        return Phi3Config(**base, sliding_window=2 * WINDOW, tie_word_embeddings=False,
                          original_max_position_embeddings=ORIGINAL_POSITIONS,
                          rope_parameters=dict(
                              rope_type="longrope", rope_theta=10000.0,
                              original_max_position_embeddings=ORIGINAL_POSITIONS,
                              short_factor=[1.0 + 0.1 * i for i in range(half)],
                              long_factor=[1.0 + 0.5 * i for i in range(half)]))
    return None


def tiny_config(family: str, vocab_size: int = 512):
    """A config of ``family`` small enough for CPU tests, with GQA where the family has it."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    new = _new_configs(family, vocab_size)
    if new is not None:
        return new

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


class OnnxDecoder:
    """An exported decoder in an onnxruntime session: a prefill, or steps with the cache
    (``present`` fed back as ``past``), every row attended in full. Activation dtype as the
    graph says (float16 for a ``--provider cuda`` export)."""

    def __init__(self, path, provider: str = "CPUExecutionProvider"):
        import numpy as np
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=[provider])
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.dtype = np.float16 if "float16" in self.past[0].type else np.float32

    def run(self, ids, cache: dict | None = None):
        """Logits ``(B, S, V)`` of ``ids`` ``(B, S)`` after ``cache`` (none: empty), and the
        new cache."""
        import numpy as np

        b, s = ids.shape
        cache = cache or {i.name: np.zeros((b, i.shape[1], 0, i.shape[3]), self.dtype)
                          for i in self.past}
        p = next(iter(cache.values())).shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, p + s), np.int64),
                 "position_ids": np.arange(p, p + s)[None].repeat(b, 0),
                 "total_sequence_length": np.array(p + s, np.int32), **cache}
        out = dict(zip(self.outputs, self.sess.run(None, feeds)))
        new = {k.replace("present.", "past_key_values."): v for k, v in out.items()
               if k.startswith("present.")}
        return out["logits"], new

    def decode(self, ids, steps: int) -> list:
        """Logits of a prefill of ``ids`` ``(B, S)``, then of ``steps`` cached steps (the
        step's tokens: column ``t`` of ``ids``)."""
        logits, cache = self.run(ids)
        out = [logits]
        for t in range(steps):
            logits, cache = self.run(ids[:, t:t + 1], cache)
            out.append(logits)
        return out


def build_tiny_model(family: str, seed: int = 0, vocab_size: int = 512):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    return model.eval()


def export_unquantized(model_dir, path, dtype=None):
    """Export the model in ``model_dir`` to ``path`` with every layer fp16 (no qparams) and
    activations in ``dtype`` (default float32); returns the loaded model."""
    import numpy as np

    from quantcal.export.builder import save_model
    from quantcal.export.graphs import build_decoder
    from quantcal.formats import FP16
    from quantcal.models import load_model, quantizable_layers

    model, _ = load_model(str(model_dir))
    formats = {n: FP16() for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    graph = build_decoder(model, formats, {}, dtype or np.float32).model()
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
