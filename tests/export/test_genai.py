"""An export folder is an onnxruntime-genai model: `og.Model(folder)` loads what `quantcal
export` wrote, and genai's own greedy decoding (its generator, KV cache, position and mask
handling, tokenizer) gives the tokens and text of `quantcal generate`, on tiny random
Llama, Qwen2 and GPT-2 models under a mixed int8 / int4-g32 plan and an int8 one (q/k/v
and gate/up fused into one node each). genai is the independent reference here: nothing of
quantcal runs inside it. Its reading of the config (search defaults, special tokens, chat
template) is checked through its own API too.

Needs onnxruntime-genai (`pip install quantcal[genai]`: onnxruntime-genai-cuda, which runs
on CPU machines too and shares onnxruntime-gpu's runtime) and the shipped C4 sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tinymodels import tiny_config

from quantcal.cli import cli
from quantcal.export.genai import CUDA_OPTIONS, GENAI_CONFIG, special_tokens
from quantcal.graphrunner import decoding_runner
from quantcal.provenance import record_path, sha256_file
from quantcal.rundir import EXPORT_JSON, MODEL, RunDir

og = pytest.importorskip("onnxruntime_genai",
                         reason="onnxruntime-genai is not installed: pip install quantcal[genai]")

PROMPT = "The capital of France is"
NEW = 24
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# sampling defaults the model ships: genai_config.json's search section must say the same
GENERATION = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                  repetition_penalty=1.1)


def _invoke(*args: str) -> str:
    """The command's standard output; it must succeed."""
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output
    return res.stdout


def _model_dir(tmp, tokenizer, family: str):
    """A tiny random model of ``family`` (weights wide enough that greedy decoding does not
    repeat one token), with the tokenizer's end token as bos/eos/pad, sampling defaults in
    its generation config and a chat template beside the tokenizer."""
    config = tiny_config(family)
    config.initializer_range = 0.3
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, **GENERATION)
    out = tmp / family
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT, encoding="utf-8")
    return out


def _calibrate(model_dir, run, c4: str) -> RunDir:
    _invoke("calibrate", "--model", str(model_dir), "--data", c4, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
            "--sensitivity-samples", "2", "--formats", "int8,int4-g32",
            "--target-bits", "9", "--device", "cpu", "--run", str(run))
    return RunDir(run)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def exported(request, tmp_path_factory, tiny_tokenizer, c4_file):
    """(model folder, run) with a CPU export of ``family`` in the run directory."""
    tmp = tmp_path_factory.mktemp(f"genai-{request.param}")
    model_dir = _model_dir(tmp, tiny_tokenizer, request.param)
    run = _calibrate(model_dir, tmp / "run", c4_file)
    _invoke("export", "--provider", "cpu", "--run", str(run.path))
    return model_dir, run


def _genai_greedy(folder, ids: list[int], new: int) -> tuple[list[int], np.ndarray]:
    """genai's greedy tokens after ``ids`` and its logits at the prompt's last position."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    # plain greedy: the model's defaults (sampling, repetition penalty) switched off
    params.set_search_options(do_sample=False, repetition_penalty=1.0,
                              max_length=len(ids) + new)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    logits = np.array(generator.get_logits(), dtype=np.float64).reshape(-1)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


def test_genai_greedy_equals_quantcal_generate(exported):
    model_dir, run = exported
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    genai_tok = og.Tokenizer(og.Model(str(run.path)))
    ids = hf_tok(PROMPT, add_special_tokens=False).input_ids  # as `quantcal generate` does
    assert [int(t) for t in genai_tok.encode(PROMPT)] == ids

    tokens, logits = _genai_greedy(run.path, ids, NEW)
    runner = decoding_runner(run.file(MODEL), "cpu")
    ours = runner.generate(ids, NEW, eos_token_id=hf_tok.eos_token_id)
    assert tokens == ours
    assert len(set(ours)) > 3  # a sequence that tells models apart, not one repeated token
    prefill = runner.prefill(np.array([ids]))[0, -1].astype(np.float64)
    assert np.abs(logits - prefill).max() < 1e-4 * max(1.0, np.abs(prefill).max())

    printed = _invoke("generate", "--run", str(run.path), "--prompt", PROMPT,
                      "--max-new-tokens", str(NEW), "--provider", "cpu")
    # the text `quantcal generate` printed is those tokens' (genai's decoder stops at the
    # first broken UTF-8 sequence that random tokens make, so HF's decodes them)
    assert printed == PROMPT + hf_tok.decode(tokens, skip_special_tokens=True) + "\n"
    assert genai_tok.decode(np.array(ids, np.int32)) == PROMPT


def test_genai_reads_the_models_defaults_and_tokenizer(exported):
    model_dir, run = exported
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    model = og.Model(str(run.path))
    search = og.GeneratorParams(model).get_search_options()
    for key, value in GENERATION.items():
        assert search[key] == pytest.approx(value), key
    config = json.loads(run.file(GENAI_CONFIG).read_text())
    assert search["max_length"] == config["model"]["context_length"] == 256
    assert search["past_present_share_buffer"]
    genai_tok = og.Tokenizer(model)
    assert list(genai_tok.eos_token_ids) == [hf_tok.eos_token_id]
    assert genai_tok.bos_token_id == genai_tok.pad_token_id == hf_tok.eos_token_id
    messages = [{"role": "user", "content": "Hi there"}]
    assert genai_tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True) \
        == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # committed with the export and listed, with their digests, in its record
    record = json.loads(run.file(EXPORT_JSON).read_text())
    assert {"model.genai.onnx", GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(record["genai"])
    assert all(sha256_file(run.file(n)) == d for n, d in record["genai"].items())
    assert (run.file("chat_template.jinja").read_bytes()
            == (model_dir / "chat_template.jinja").read_bytes())
    assert config["search"]["do_sample"] is True and "provider_options" in json.dumps(config)
    assert not (run.path / ".staging").exists()


def test_genai_graph_drops_position_ids_nothing_reads(exported):
    """Rotary inside GroupQueryAttention reads no position_ids: like genai's builder, the
    genai graph and config leave it out (genai keeps no position state to update, which is
    what broke its CUDA graph capture); GPT-2's learned positions keep it."""
    import onnx

    model_dir, run = exported
    graph = onnx.load(str(run.file("model.genai.onnx")), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    read = {name for node in graph.node for name in node.input}
    config = json.loads(run.file(GENAI_CONFIG).read_text())["model"]["decoder"]["inputs"]
    gpt2 = json.loads((model_dir / "config.json").read_text())["model_type"] == "gpt2"
    assert ("position_ids" in inputs) == ("position_ids" in config) == gpt2
    assert "position_ids" not in inputs or "position_ids" in read
    assert "total_sequence_length" not in inputs


def test_export_elsewhere_is_a_genai_model_beside_its_file(exported, tmp_path):
    model_dir, run = exported
    out = tmp_path / "elsewhere" / "small.onnx"
    _invoke("export", "--provider", "cpu", "--run", str(run.path), "-o", str(out))
    config = json.loads((out.parent / GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == "small.genai.onnx"
    record = json.loads(record_path(out).read_text())
    assert set(record["genai"]) >= {"small.genai.onnx", GENAI_CONFIG, "tokenizer.json"}
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, add_special_tokens=False).input_ids
    tokens, _ = _genai_greedy(out.parent, ids, 8)
    assert tokens == decoding_runner(out, "cpu").generate(ids, 8)


def test_genai_runs_fused_projections(exported, tmp_path):
    """One format everywhere: every block's q/k/v is one node feeding GroupQueryAttention
    packed, and (--fuse-mlp) gate/up one node (export/fusion.py); genai's greedy decoding of
    that export still gives quantcal's tokens, and the export's logits are `--no-fuse`'s."""
    model_dir, run = exported
    plan, out = tmp_path / "plan.json", tmp_path / "fused" / "fused.onnx"
    _invoke("plan", "--run", str(run.path), "--no-measure", "--target-bits", "16",
            "--force", "*=int8", "-o", str(plan))
    _invoke("export", "--provider", "cpu", "--run", str(run.path), "--plan", str(plan),
            "-o", str(out), "--fuse-mlp")
    fused = json.loads(record_path(out).read_text())["fused"]
    gpt2 = json.loads((model_dir / "config.json").read_text())["model_type"] == "gpt2"
    assert len(fused) == (0 if gpt2 else 4)  # checkpoint-fused c_attn; else 2 per block
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    tokens, logits = _genai_greedy(out.parent, ids, NEW)
    runner = decoding_runner(out, "cpu")
    assert tokens == runner.generate(ids, NEW, eos_token_id=tok.eos_token_id)
    prefill = runner.prefill(np.array([ids]))[0, -1].astype(np.float64)
    assert np.abs(logits - prefill).max() < 1e-4 * max(1.0, np.abs(prefill).max())
    apart = tmp_path / "apart" / "apart.onnx"
    _invoke("export", "--provider", "cpu", "--run", str(run.path), "--plan", str(plan),
            "-o", str(apart), "--no-fuse")
    np.testing.assert_array_equal(decoding_runner(apart, "cpu").prefill(np.array([ids])),
                                  runner.prefill(np.array([ids])))


def test_special_tokens_follow_generation_config_then_config_then_tokenizer():
    class Ids:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    gen = Ids(eos_token_id=[5, 7], bos_token_id=None, pad_token_id=None)
    config = Ids(eos_token_id=9, bos_token_id=1, pad_token_id=None)
    tok = Ids(eos_token_id=0, bos_token_id=3, pad_token_id=None)
    # the tokenizer's end token joins the list: genai stops where `quantcal generate` does
    assert special_tokens(config, gen, tok) == {"bos_token_id": 1, "eos_token_id": [5, 7, 0],
                                                "pad_token_id": 5}
    assert special_tokens(Ids(), None, Ids(eos_token_id=2, pad_token_id=4)) == {
        "eos_token_id": [2], "pad_token_id": 4}


def _cuda_export(tmp_path, tokenizer, c4_file):
    """A CUDA (fp16) export of the tiny Llama and the prompt's ids."""
    model_dir = _model_dir(tmp_path, tokenizer, "llama")
    run = _calibrate(model_dir, tmp_path / "run", c4_file)
    _invoke("export", "--provider", "cuda", "--run", str(run.path))
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, add_special_tokens=False).input_ids
    return run, ids


@pytest.mark.gpu
def test_genai_cuda_greedy_equals_quantcal(tmp_path, tiny_tokenizer, c4_file):
    """A CUDA (fp16) export through genai on the CUDA provider with the CUDA graph on, as
    genai_config.json says, against quantcal's decoding on the same card."""
    run, ids = _cuda_export(tmp_path, tiny_tokenizer, c4_file)
    config = json.loads(run.file(GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [
        {"cuda": CUDA_OPTIONS}]
    tokens, _ = _genai_greedy(run.path, ids, NEW)
    runner = decoding_runner(run.file(MODEL), "cuda")
    assert runner.provider == "cuda"
    assert tokens == runner.generate(ids, NEW, eos_token_id=tiny_tokenizer.eos_token_id)


@pytest.mark.gpu
def test_genai_cuda_without_graph(tmp_path, tiny_tokenizer, c4_file):
    """The export's CUDA graph setting switched off, as genai's builder writes it."""
    run, ids = _cuda_export(tmp_path, tiny_tokenizer, c4_file)
    config = json.loads(run.file(GENAI_CONFIG).read_text())
    config["model"]["decoder"]["session_options"]["provider_options"] = [
        {"cuda": {"enable_cuda_graph": "0"}}]
    run.file(GENAI_CONFIG).write_text(json.dumps(config))
    tokens, _ = _genai_greedy(run.path, ids, NEW)
    runner = decoding_runner(run.file(MODEL), "cuda")
    assert tokens == runner.generate(ids, NEW, eos_token_id=tiny_tokenizer.eos_token_id)
