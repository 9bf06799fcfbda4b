"""Tests for quantcal.evaluate.tasks: lm-eval's HellaSwag preprocessing and acc/acc_norm
(hub rows exact, local rows lm-eval-like), GSM8K's few-shot sampler, prompt and answer
filters, standard errors, perplexity windows, document selection, the real data files
(tests/data; the full shared/data where a test takes full_data) and the offline-hub
error. test_lm_eval_golden.py compares with lm-eval's output.

CPU only, no network: conftest forces the hub offline.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from quantcal.errors import QuantcalError
from quantcal.evaluate import tasks
from quantcal.evaluate.tasks import (
    GSM8K, TASKS, GenerateRequest, Gsm8kDoc, HellaSwag, HellaswagDoc, LoglikelihoodRequest,
    Metric, PerplexityWindow, draw_shots, get_task, gsm8k_prompt, hellaswag_doc,
    mean_stderr, normalize_answer, preprocess, select, sliding_windows,
)


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def char_tokenizer(text: str) -> dict:
    return {"input_ids": [ord(c) for c in text]}


# ---------------------------------------------------------------- HellaSwag


def test_preprocess_title_and_step():
    text = " How to wash a dog [title] Fill the tub. [step] Use warm water. "
    assert preprocess(text) == "How to wash a dog. Fill the tub. Use warm water."


def test_preprocess_header_keeps_lm_eval_quirks():
    # strip() runs first, so removing a leading [header] leaves the space after it
    assert preprocess("[header] Cleaning [title] Scrub it.") == " Cleaning. Scrub it."
    assert preprocess("Done [substeps] now") == "Done now"
    assert preprocess("no tags at all") == "no tags at all"


def test_hub_row_is_processed_like_lm_eval():
    row = {"activity_label": "Washing a dog", "ctx_a": "A man fills a tub [title] Step.",
           "ctx_b": "then he pours IN soap", "endings": ["[step] a.", " b  c "],
           "label": "1"}
    doc = hellaswag_doc(row)
    # capitalize() lower-cases the rest of ctx_b, as in lm-eval
    assert doc.query == "Washing a dog: A man fills a tub. Step. Then he pours in soap"
    assert doc.choices == (" a.", "b c")
    assert doc.gold == 1


def test_local_row_gets_the_same_cleanup_but_no_capital():
    # the local file has ctx = ctx_a + " " + ctx_b only: lm-eval's cleanup applies to the
    # whole (the file still holds some [bracketed] text), but ctx_b ("he") stays lower case
    row = {"idx": 0, "activity_label": "Roofing", "ctx": "A man [title] is. he",
           "endings": ["x  y", "see [www.example.org] now"], "label": 0}
    assert hellaswag_doc(row) == HellaswagDoc("Roofing: A man. is. he", ("x y", "see now"), 0,
                                              exact=False)
    hub = dict(row, ctx_a="A man [title] is.", ctx_b="he")
    assert hellaswag_doc(hub) == HellaswagDoc("Roofing: A man. is. He", ("x y", "see now"), 0)


def test_protocol_labels_local_documents_lm_eval_like():
    exact, local = HellaswagDoc("q", ("a",), 0), HellaswagDoc("q", ("a",), 0, exact=False)
    assert HellaSwag().protocol([exact, exact]) == "lm-eval"
    assert HellaSwag().protocol([exact, local]).startswith("lm-eval-like: ")
    assert GSM8K().protocol([]) == "lm-eval"
    assert GSM8K(num_fewshot=0).protocol([]).startswith("lm-eval-like: 0-shot")


def test_requests_prefix_a_space():
    doc = HellaswagDoc("Q: ctx", ("one", "two"), 0)
    assert HellaSwag().requests(doc) == [LoglikelihoodRequest("Q: ctx", " one"),
                                         LoglikelihoodRequest("Q: ctx", " two")]


def test_acc_and_acc_norm_choose_different_answers():
    doc = HellaswagDoc("q", ("a", "a much longer ending here"), gold=1)
    scores = HellaSwag().score(doc, [(-2.0, True), (-10.0, False)])
    assert scores == {"acc": 0.0, "acc_norm": 1.0}  # -2/1 < -10/25
    doc0 = HellaswagDoc("q", doc.choices, gold=0)
    assert HellaSwag().score(doc0, [(-2.0, True), (-10.0, False)]) == {"acc": 1.0,
                                                                       "acc_norm": 0.0}


def test_acc_norm_divides_by_the_choice_without_its_space():
    # lm-eval: len(doc_to_choice(doc)[i]); dividing by len(" " + choice) would pick 0 here
    doc = HellaswagDoc("q", ("abcd", "abcdefghi"), gold=1)
    lls = [(-4.4, False), (-9.8, False)]
    assert -4.4 / 5 > -9.8 / 10 and -4.4 / 4 < -9.8 / 9
    assert HellaSwag().score(doc, lls)["acc_norm"] == 1.0


def test_ties_go_to_the_first_choice_and_counts_must_match():
    doc = HellaswagDoc("q", ("ab", "cd"), gold=0)
    assert HellaSwag().score(doc, [(-1.0, True), (-1.0, True)]) == {"acc": 1.0,
                                                                    "acc_norm": 1.0}
    with pytest.raises(ValueError):
        HellaSwag().score(doc, [(-1.0, True)])


# ---------------------------------------------------------------- aggregation


def test_stderr_matches_a_hand_computation():
    # mean 0.75; sample variance ((3 * 0.25**2) + 0.75**2) / 3 = 0.25; stderr 0.5 / 2
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == Metric(0.75, 0.25)
    m = HellaSwag().aggregate([{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0, "acc_norm": 0.0},
                               {"acc": 1.0, "acc_norm": 1.0}])
    assert m["acc"].value == pytest.approx(2 / 3)
    assert m["acc"].stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert m["acc_norm"].value == pytest.approx(1 / 3)
    assert mean_stderr([0.5]) == Metric(0.5, None)


def test_select_limit_and_sample():
    docs = list(range(10))
    assert select(docs) == docs
    assert select(docs, limit=3) == [0, 1, 2]
    assert select(docs, limit=50) == docs
    picked = select(docs, sample=4, seed=7)
    assert picked == sorted(random.Random(7).sample(range(10), 4))
    assert picked == select(docs, sample=4, seed=7) != select(docs, sample=4, seed=8)
    assert select(docs, sample=20) == docs
    with pytest.raises(QuantcalError, match="not both"):
        select(docs, limit=2, sample=2)
    with pytest.raises(QuantcalError, match="--limit must be at least 1"):
        select(docs, limit=0)


# ---------------------------------------------------------------- GSM8K


TRAIN = [{"question": f"q{i}?", "answer": f"a{i}\n#### {i}"} for i in range(8)]
TEST = [{"question": f"t{i}?", "answer": f"s{i}\n#### {10 + i}"} for i in range(3)]


@pytest.fixture
def gsm8k_dir(tmp_path) -> Path:
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", TRAIN)
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", TEST)
    return tmp_path


def test_fewshot_prompt_text_exactly(gsm8k_dir):
    docs = GSM8K().load(gsm8k_dir)
    # random.Random(1234): sample(range(8), 5) -> [7, 0, 6, 5, 4], then [1, 0, 2, 7, 6]
    assert [tuple(q for q, _ in d.shots) for d in docs[:2]] == [
        ("q7?", "q0?", "q6?", "q5?", "q4?"), ("q1?", "q0?", "q2?", "q7?", "q6?")]
    assert gsm8k_prompt(docs[1]) == (
        "Question: q1?\nAnswer: a1\n#### 1\n\n"
        "Question: q0?\nAnswer: a0\n#### 0\n\n"
        "Question: q2?\nAnswer: a2\n#### 2\n\n"
        "Question: q7?\nAnswer: a7\n#### 7\n\n"
        "Question: q6?\nAnswer: a6\n#### 6\n\n"
        "Question: t1?\nAnswer:")
    (req,) = GSM8K().requests(docs[1])
    assert req == GenerateRequest(gsm8k_prompt(docs[1]), ("Question:", "</s>", "<|im_end|>"),
                                  256)


def test_limit_and_sample_keep_each_docs_exemplars(gsm8k_dir):
    full = GSM8K().load(gsm8k_dir)
    assert GSM8K().load(gsm8k_dir, limit=2) == full[:2]
    picked = GSM8K().load(gsm8k_dir, sample=2, seed=3)
    assert picked == [full[i] for i in sorted(random.Random(3).sample(range(3), 2))]


def test_same_split_draws_one_more_and_drops_the_doc():
    # random.Random(1234): sample(range(8), 6) -> [7, 0, 6, 5, 4, 2], then [1, 0, 2, 7, 6, 3]
    assert draw_shots(TRAIN[:2], TRAIN, num_fewshot=5, same_split=True) == [
        (7, 6, 5, 4, 2), (0, 2, 7, 6, 3)]


def test_sampler_matches_lm_eval_contextsampler_on_real_train(sample_data):
    rows = [json.loads(line) for line in
            (sample_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    pool = [json.loads(line) for line in
            (sample_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    rnd = random.Random(1234)  # lm-eval: rnd.sample(docs, n), drop doc, keep first 5
    expected = [[x for x in rnd.sample(pool, 5) if x != doc][:5] for doc in rows[:30]]
    got = draw_shots(rows[:30], pool)
    assert [[pool[i] for i in idx] for idx in got] == expected


def _scores(text: str, gold: str) -> tuple[float, float]:
    s = GSM8K().score(Gsm8kDoc("q", f"Some working.\n#### {gold}"), [text])
    return s["exact_match_strict"], s["exact_match_flexible"]


@pytest.mark.parametrize("text, gold, expected", [
    ("The answer is $1,234.", "1234", (0.0, 1.0)),          # flexible only; strict needs ####
    ("So 2 + 3 = 5.\n#### 1,234", "1234", (1.0, 1.0)),
    ("It drops 3 degrees to -5.\n#### -5", "-5", (1.0, 1.0)),
    ("It ends at -5", "-5", (0.0, 1.0)),
    ("#### 42.", "42", (1.0, 1.0)),                          # trailing period ignored
    ("First 3, then 7, total 10 apples", "10", (0.0, 1.0)),  # flexible takes the last
    ("#### 10 and later 12", "10", (1.0, 0.0)),              # strict takes the first
    ("It costs $18.00", "18", (0.0, 0.0)),                   # lm-eval keeps ".00"
    ("no number at all", "3", (0.0, 0.0)),
    ("#### 5\n\nQuestion: next one\n#### 6", "5", (1.0, 1.0)),  # cut at the stop string
])
def test_answer_filters(text, gold, expected):
    assert _scores(text, gold) == expected


def test_filters_and_normalisation_pieces():
    assert tasks.regex_extract(tasks.FLEXIBLE, "The answer is $1,234.", -1) == "$1,234."
    assert tasks.regex_extract(tasks.FLEXIBLE, "it is -5 now", -1) == "-5"
    assert tasks.regex_extract(tasks.STRICT, "nothing") == "[invalid]"
    assert normalize_answer("Janet sells 9.\nShe makes $18.\n#### 18") == "18"
    assert normalize_answer("$1,234.") == "1234"


# ---------------------------------------------------------------- perplexity


def test_windows_small_example():
    got = sliding_windows(list(range(10)), seq_len=4, stride=2)
    assert got == [PerplexityWindow([0, 1, 2, 3], 1), PerplexityWindow([2, 3, 4, 5], 2),
                   PerplexityWindow([4, 5, 6, 7], 2), PerplexityWindow([6, 7, 8, 9], 2)]


@pytest.mark.parametrize("n, seq_len, stride", [
    (1000, 128, 64), (1000, 128, 127), (1000, 128, 1), (1001, 100, 33), (50, 128, 64),
    (129, 128, 64), (2, 2, 1)])
def test_windows_score_every_token_after_the_first_once(n, seq_len, stride):
    ids = list(range(n))
    counts = [0] * n
    windows = sliding_windows(ids, seq_len, stride)
    for k, w in enumerate(windows):
        begin = w.input_ids[0]
        assert begin == k * stride and 1 <= w.score_from < len(w.input_ids) <= seq_len
        assert w.input_ids == ids[begin:begin + len(w.input_ids)]
        for pos in range(w.score_from, len(w.input_ids)):
            counts[begin + pos] += 1
    assert counts == [0] + [1] * (n - 1)


def test_disjoint_windows_skip_each_windows_first_token():
    windows = sliding_windows(list(range(10)), seq_len=4, stride=4)
    assert [(w.input_ids, w.score_from) for w in windows] == [
        ([0, 1, 2, 3], 1), ([4, 5, 6, 7], 1), ([8, 9], 1)]


def test_window_settings_are_checked():
    with pytest.raises(QuantcalError, match="stride"):
        get_task("wikitext2", seq_len=128, stride=256)
    with pytest.raises(QuantcalError, match="stride"):
        sliding_windows([1, 2, 3], seq_len=4, stride=0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    task = get_task("c4", seq_len=64, stride=32)
    windows = sliding_windows(list(range(500)), 64, 32)
    per_doc = [task.score(w, [w.n_scored * math.log(50)]) for w in windows]
    m = task.aggregate(per_doc)
    assert m["perplexity"].value == pytest.approx(50.0)
    assert m["perplexity"].stderr == pytest.approx(0.0, abs=1e-9)  # every window alike
    assert m["scored_tokens"].value == 499


def test_wikitext_local_file(sample_data, tiny_tokenizer):
    task = get_task("wikitext2", seq_len=512, stride=256)
    windows = task.load(sample_data, tokenizer=tiny_tokenizer)
    lines = (sample_data / "wikitext2" / "wiki.test.raw").read_bytes().decode().split("\r\n")
    assert lines.pop() == "" and all(line.strip() for line in lines)  # this copy: no blanks
    text = "\n\n".join(line + "\n" for line in lines)  # the hub's rows, joined
    ids = tiny_tokenizer(text)["input_ids"]
    assert windows[0].input_ids == ids[:512]
    assert sum(w.n_scored for w in windows) == len(ids) - 1


def test_c4_local_file_joins_documents(sample_data, c4_texts):
    windows = get_task("c4", seq_len=4096, stride=4096).load(sample_data, limit=1,
                                                             tokenizer=char_tokenizer)
    expected = "\n\n".join(c4_texts[60:])[:4096]  # the second half: calibration has the first
    assert "".join(map(chr, windows[0].input_ids)) == expected
    with pytest.raises(ValueError, match="tokenizer"):
        get_task("c4").load(sample_data)


# ---------------------------------------------------------------- real data, hub, registry


def test_real_hellaswag(sample_data):
    docs = TASKS["hellaswag"].load(sample_data)
    assert len(docs) == 44
    assert docs[0] == HellaswagDoc(
        "Roof shingle removal: A man is sitting on a roof. he",
        ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
         "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3,
        exact=False)  # lm-eval, from ctx_a/ctx_b, would end the query "... roof. He"
    assert TASKS["hellaswag"].protocol(docs).startswith("lm-eval-like")
    # the file's leftover [bracketed] text (items 3505, 4016, 4041, 5592 of the full set) is
    # removed as lm-eval removes it
    assert docs[40].query.endswith("Visit a site like to find loads of creative activities "
                                   "for toddlers and preschoolers.. Choose small, simple "
                                   "games like candy land or chutes and ladders.")
    assert docs[41].choices[3].endswith('Try searching for " local events in .')
    assert not any("[" in c and "]" in c for d in docs for c in (d.query, *d.choices))


def test_full_hellaswag(full_data, sample_data):
    docs = TASKS["hellaswag"].load(full_data)
    assert len(docs) == 10042
    sample = TASKS["hellaswag"].load(sample_data)
    assert [docs[i] for i in (*range(40), 3505, 4016, 4041, 5592)] == sample
    assert not any("[" in c and "]" in c for d in docs for c in d.choices)
    assert [sum(d.gold == k for d in docs) for k in range(4)] == [2515, 2485, 2584, 2458]


def test_real_gsm8k_through_env(sample_data, monkeypatch):
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(sample_data))
    docs = TASKS["gsm8k"].load()
    assert len(docs) == 20
    assert docs[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert docs[0].answer.endswith("#### 18")
    assert all(len(d.shots) == 5 for d in docs)
    assert GSM8K().score(docs[0], ["She makes 9 * 2 = $18.\n#### 18"]) == {
        "exact_match_strict": 1.0, "exact_match_flexible": 1.0}


def test_full_gsm8k(full_data):
    docs = TASKS["gsm8k"].load(full_data)
    assert len(docs) == 1319 and all(len(d.shots) == 5 for d in docs)
    assert docs[0].shots[0][0].startswith("Jen and Tyler are gymnasts")  # lm-eval's draw


def test_offline_hub_says_what_to_do(tmp_path):
    for name in ("hellaswag", "gsm8k", "wikitext2"):
        with pytest.raises(QuantcalError, match="--data-dir DIR or set QUANTCAL_DATA_DIR"):
            TASKS[name].load(tokenizer=char_tokenizer)
    assert len(TASKS["c4"].documents()) == 200  # the packaged sample's second half instead
    with pytest.raises(QuantcalError, match="holds no hellaswag/hellaswag_val"):
        TASKS["hellaswag"].load(tmp_path)


def test_data_dir_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(QuantcalError, match="is not a folder"):
        TASKS["gsm8k"].load()


def test_registry():
    assert list(TASKS) == ["hellaswag", "gsm8k", "wikitext2", "c4"]
    assert get_task("gsm8k") is TASKS["gsm8k"]
    assert get_task("gsm8k", num_fewshot=0).num_fewshot == 0
    with pytest.raises(QuantcalError, match="choose from hellaswag, gsm8k, wikitext2, c4"):
        get_task("mmlu")
    with pytest.raises(QuantcalError, match="no setting window"):
        get_task("c4", window=3)
