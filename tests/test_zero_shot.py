"""Zero-shot protocols (m6_engine.evaluate): TNEWS, ChID and CMRC 2018 on hand-made examples in
each task's real file format. The protocol logic (parsing, errors naming the line, templates,
truncation, candidate sampling, metric math) runs against stand-in backends with known answers;
a tiny random M6 then runs each protocol through ``ModelBackend`` and ``examples/zero_shot.py``
on a saved checkpoint (one single-rank launch)."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path
from m6_engine.evaluate import (
    LABEL_WORDS, DataFormatError, evaluate_chid, evaluate_cmrc, evaluate_tnews, exact_match, f1_score,
    load_label_words, read_chid, read_cmrc, read_tnews,
)
from m6_engine.evaluate.chid import chid_inputs, window
from m6_engine.evaluate.cmrc import prompt_ids, segment
from m6_engine.evaluate.tnews import candidate_labels, template_ids
from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TNEWS = [
    {"label": "103", "label_desc": "news_sports", "sentence": "女排世锦赛：中国队三比零战胜日本队",
     "keywords": "女排,世锦赛,中国队"},
    {"label": "104", "label_desc": "news_finance", "sentence": "央行宣布下调存款准备金率", "keywords": "央行,准备金"},
    {"label": "101", "label_desc": "news_culture", "sentence": "故宫博物院推出新展览", "keywords": ""},
    {"label": "102", "label_desc": "news_entertainment", "sentence": "这部电影票房突破十亿"},
    {"label": "107", "label_desc": "news_car", "sentence": "新能源汽车销量持续增长", "keywords": "新能源,汽车"},
]
IDIOMS = ["雷厉风行", "拖泥带水", "画蛇添足", "守株待兔", "亡羊补牢", "对牛弹琴", "井底之蛙", "杯弓蛇影",
          "掩耳盗铃", "刻舟求剑"]
CHID = [
    {"content": "他做事总是#idiom#，从不拖泥带水，大家都很佩服他。", "candidates": IDIOMS, "answer": 0},
    {"content": "丢了羊以后赶紧修补羊圈，#idiom000123#，犹未为晚。", "candidates": IDIOMS, "answer": 4},
    {"content": "#idiom#说的是只看到井口那么大的天。", "candidates": IDIOMS, "answer": 6},
]
CMRC = {"version": "v1.0", "data": [
    {"id": "A1", "title": "北京", "paragraphs": [{"id": "A1P1", "context": "北京是中国的首都，位于华北平原。", "qas": [
        {"id": "Q1", "question": "中国的首都是哪里？", "answers": [{"text": "北京", "answer_start": 0}]},
        {"id": "Q2", "question": "北京位于哪里", "answers": [{"text": "华北平原", "answer_start": 10},
                                                          {"text": "位于华北平原", "answer_start": 8}]}]}]},
    {"id": "A2", "title": "苹果", "paragraphs": [{"id": "A2P1", "context": "Apple Inc. 成立于1976年。", "qas": [
        {"id": "Q3", "question": "苹果公司哪年成立？", "answers": [{"text": "1976年", "answer_start": 15}]}]}]},
]}


@pytest.fixture(scope="module")
def tokenizer():
    return BertWordPieceTokenizer(default_vocab_path())


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def _raises_at(fn, path, message: str):
    with pytest.raises(DataFormatError) as info:
        fn(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


# --------------------------------------------------------------------------- TNEWS

def test_tnews_reading_and_errors(tmp_path):
    examples = read_tnews(_jsonl(tmp_path / "ok.json", TNEWS[:2] + [""] + TNEWS[2:]), LABEL_WORDS)
    assert [e.label for e in examples] == [r["label_desc"] for r in TNEWS]
    assert [e.line for e in examples] == [1, 2, 4, 5, 6]              # the blank line is skipped
    assert examples[3].keywords == ""                                # keywords may be absent
    read = lambda p: read_tnews(p, LABEL_WORDS)  # noqa: E731
    _raises_at(read, _jsonl(tmp_path / "a.json", [TNEWS[0], "{not json"]), ":2: not valid JSON")
    _raises_at(read, _jsonl(tmp_path / "b.json", [TNEWS[0], TNEWS[1], {"label_desc": "news_car"}]),
               ":3: missing field 'sentence'")
    _raises_at(read, _jsonl(tmp_path / "c.json", [{**TNEWS[0], "label_desc": "news_cooking"}]),
               ":1: label_desc 'news_cooking' is not in the label table")
    _raises_at(read, _jsonl(tmp_path / "d.json", [{**TNEWS[0], "keywords": 3}]),
               ":1: field 'keywords' must be str")
    _raises_at(read, _jsonl(tmp_path / "e.json", ["[1, 2]"]), ":1: expected a JSON object")
    _raises_at(read, tmp_path / "missing.json", "file not found")


def test_tnews_label_table(tmp_path):
    table = {"sports": "运动", "money": "金钱", "art": "艺术", "cars": "车"}
    path = tmp_path / "words.json"
    path.write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    assert load_label_words(path) == table
    path.write_text(json.dumps({"a": "甲", "b": "乙"}), encoding="utf-8")
    _raises_at(load_label_words, path, "at least 4 labels")
    path.write_text("{\n\"a\": }", encoding="utf-8")
    _raises_at(load_label_words, path, ":2: not valid JSON")


def test_tnews_candidates_and_template(tokenizer):
    labels = sorted(LABEL_WORDS)
    for index in range(20):
        cands = candidate_labels(labels, "news_car", 1, index)
        assert len(set(cands)) == 4 and "news_car" in cands
        assert cands == candidate_labels(labels, "news_car", 1, index)         # deterministic
    assert len({tuple(candidate_labels(labels, "news_car", s, 0)) for s in (1, 2, 3)}) > 1
    positions = {candidate_labels(labels, "news_car", 1, i).index("news_car") for i in range(20)}
    assert len(positions) > 1                                                  # the true label moves
    example = read_tnews_example(TNEWS[0])
    full = template_ids(tokenizer, example, "体育", 100)
    assert tokenizer.decode(full) == "标题:女排世锦赛：中国队三比零战胜日本队;关键词:女排,世锦赛,中国队;分类:体育"
    short = template_ids(tokenizer, example, "体育", len(full) - 5)            # keywords lose 5 tokens
    assert tokenizer.decode(short) == "标题:女排世锦赛：中国队三比零战胜日本队;关键词:女排,世锦;分类:体育"
    tiny = template_ids(tokenizer, example, "体育", 18)                         # keywords gone, title cut
    assert tokenizer.decode(tiny) == "标题:女排世锦;关键词:;分类:体育" and len(tiny) == 18


def read_tnews_example(row):
    from m6_engine.evaluate.tnews import TNEWSExample

    return TNEWSExample(row["sentence"], row.get("keywords", ""), row["label_desc"], 1)


class RankedLabels:
    """Stand-in backend: a text's perplexity is the rank of the label word it ends with."""

    def __init__(self, tokenizer, order):
        self.rank = {tuple(tokenizer.encode(LABEL_WORDS[label])): i + 1.0 for i, label in enumerate(order)}
        self.calls = []

    def perplexities(self, masked_ids, texts):
        self.calls.append((tuple(masked_ids), len(texts)))
        return [next(r for words, r in self.rank.items() if tuple(t[-len(words):]) == words) for t in texts]


def test_tnews_protocol_math(tmp_path, tokenizer):
    examples = read_tnews(_jsonl(tmp_path / "t.json", TNEWS), LABEL_WORDS)
    preferred = ["news_sports", "news_car", "news_finance"]
    order = preferred + sorted(set(LABEL_WORDS) - set(preferred))
    backend = RankedLabels(tokenizer, order)
    seeds = (1, 2, 3)
    metrics, records = evaluate_tnews(backend, tokenizer, examples, LABEL_WORDS, 64, seeds)
    expected = []
    for k, seed in enumerate(seeds):
        hits = [min(candidate_labels(sorted(LABEL_WORDS), e.label, seed, i), key=order.index) == e.label
                for i, e in enumerate(examples)]
        expected.append(np.mean(hits))
    assert metrics["accuracy_per_seed"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(np.mean(expected)) and metrics["examples"] == 5
    assert 0 < metrics["accuracy"] < 1                          # the case mixes right and wrong
    assert all(masked == () for masked, _ in backend.calls)     # empty prefix: language modelling
    first = records[0]["rounds"][0]
    assert first["prediction"] == "news_sports" and len(first["candidates"]) == 4
    assert first["perplexities"] == [order.index(c) + 1.0 for c in first["candidates"]]


# --------------------------------------------------------------------------- ChID

def test_chid_reading_and_errors(tmp_path):
    examples = read_chid(_jsonl(tmp_path / "c.json", CHID))
    assert examples[1].left == "丢了羊以后赶紧修补羊圈，" and examples[1].right == "，犹未为晚。"
    assert examples[2].left == "" and [e.answer for e in examples] == [0, 4, 6]
    bad = [({**CHID[0], "content": "没有空"}, ":2: content must hold exactly one #idiom# blank, found 0"),
           ({**CHID[0], "content": "#idiom#和#idiom#"}, "found 2"),
           ({**CHID[0], "answer": 10}, ":2: answer 10 is not an index of the 10 candidates"),
           ({**CHID[0], "candidates": "雷厉风行"}, ":2: field 'candidates' must be list"),
           ({**CHID[0], "answer": "0"}, ":2: field 'answer' must be int"),
           ({**CHID[0], "candidates": ["甲"]}, "at least 2")]
    for i, (row, message) in enumerate(bad):
        _raises_at(read_chid, _jsonl(tmp_path / f"bad{i}.json", [CHID[0], row]), message)


def test_chid_window_and_inputs(tokenizer):
    assert window(list(range(10)), list(range(100, 102)), 8) == (list(range(4, 10)), [100, 101])
    assert window(list(range(2)), list(range(100, 110)), 8) == ([0, 1], list(range(100, 106)))
    assert window(list(range(10)), list(range(100, 110)), 7) == (list(range(7, 10)), [100, 101, 102, 103])
    examples = read_chid_rows([{**CHID[0], "content": "前" * 300 + "#idiom#" + "后" * 300}])
    masked, texts = chid_inputs(tokenizer, examples[0], tokenizer.mask_id, 512)
    prompt = tokenizer.encode("成语填空:")
    assert masked[:len(prompt)] == prompt and masked.count(tokenizer.mask_id) == 1
    body = masked[len(prompt):]
    cut = body.index(tokenizer.mask_id)
    assert len(body) - 1 <= 256 and abs(cut - (len(body) - 1 - cut)) <= 1    # centred on the blank
    assert len(masked) <= 256 and all(len(t) + 2 <= 256 for t in texts)
    for idiom, text in zip(IDIOMS, texts):
        assert text == body[:cut] + tokenizer.encode(idiom) + body[cut + 1:]
    small_masked, small_texts = chid_inputs(tokenizer, examples[0], tokenizer.mask_id, 64)
    assert len(small_masked) <= 32 and all(len(t) + 2 <= 32 for t in small_texts)


def read_chid_rows(rows):
    from m6_engine.evaluate.chid import BLANK, ChIDExample

    return [ChIDExample(*BLANK.split(r["content"]), tuple(r["candidates"]), r["answer"], 1) for r in rows]


class FavouriteIdiom:
    """Stand-in backend: the text holding the favourite idiom has perplexity 1, the others 2."""

    def __init__(self, tokenizer, idiom):
        self.ids = tokenizer.encode(idiom)
        self.masked = []

    def perplexities(self, masked_ids, texts):
        self.masked.append(masked_ids)
        n = len(self.ids)
        return [1.0 if any(t[i:i + n] == self.ids for i in range(len(t))) else 2.0 for t in texts]


def test_chid_protocol_math(tmp_path, tokenizer):
    examples = read_chid(_jsonl(tmp_path / "c.json", CHID))
    backend = FavouriteIdiom(tokenizer, "亡羊补牢")
    metrics, records = evaluate_chid(backend, tokenizer, examples, tokenizer.mask_id, 128)
    assert metrics == {"accuracy": pytest.approx(1 / 3), "examples": 3}
    assert [r["prediction"] for r in records] == [4, 4, 4]
    assert all(m.count(tokenizer.mask_id) == 1 for m in backend.masked)


# --------------------------------------------------------------------------- CMRC 2018

def test_cmrc_reading_and_errors(tmp_path):
    path = tmp_path / "cmrc.json"
    path.write_text(json.dumps(CMRC, ensure_ascii=False, indent=1), encoding="utf-8")
    questions = read_cmrc(path)
    assert [q.qid for q in questions] == ["Q1", "Q2", "Q3"]
    assert questions[1].answers == ("华北平原", "位于华北平原")
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}', encoding="utf-8")
    _raises_at(read_cmrc, path, ":2: not valid JSON")
    broken = json.loads(json.dumps(CMRC))
    del broken["data"][1]["paragraphs"][0]["qas"][0]["answers"]
    path.write_text(json.dumps(broken), encoding="utf-8")
    _raises_at(read_cmrc, path, "data[1].paragraphs[0].qas[0]: question 'Q3' has no 'answers' list")
    broken = json.loads(json.dumps(CMRC))
    broken["data"][0]["paragraphs"][0]["context"] = None
    path.write_text(json.dumps(broken), encoding="utf-8")
    _raises_at(read_cmrc, path, "data[0].paragraphs[0]: expected a string 'context'")


def test_cmrc_metrics():
    assert segment("Apple Inc. 成立于1976年！") == ["apple", "inc", "成", "立", "于", "1976", "年"]
    assert f1_score("北京", ["北京"]) == 1.0 and exact_match("北京。", ["北京"]) == 1.0
    assert f1_score("北京大学", ["北京"]) == pytest.approx(2 * 0.5 * 1 / 1.5)     # P 2/4, R 2/2
    # longest common *contiguous* run: 华北 (2 of 4 reference, 2 of 3 prediction)
    assert f1_score("在华北", ["华北平原"]) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert f1_score("平北华", ["华北平原"]) == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert f1_score("位于华北平原", ["华北平原", "位于华北平原"]) == 1.0          # best reference
    assert exact_match("Apple inc", ["apple Inc."]) == 1.0 and exact_match("苹果", ["北京"]) == 0.0
    assert f1_score("", ["北京"]) == 0.0 and exact_match("", ["北京"]) == 0.0


class FixedAnswers:
    def __init__(self, tokenizer, answers):
        self.ids = [tokenizer.encode(a) for a in answers]
        self.prompts = []

    def generate(self, masked_texts):
        self.prompts += masked_texts
        return self.ids[:len(masked_texts)]


def test_cmrc_protocol_math(tmp_path, tokenizer):
    path = tmp_path / "cmrc.json"
    path.write_text(json.dumps(CMRC, ensure_ascii=False), encoding="utf-8")
    questions = read_cmrc(path)
    backend = FixedAnswers(tokenizer, ["北京", "在华北", "1976"])
    metrics, records = evaluate_cmrc(backend, tokenizer, questions, 64)
    f1 = [1.0, 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4), 2 * 1 * 0.5 / 1.5]
    assert metrics["f1"] == pytest.approx(100 * np.mean(f1)) and metrics["em"] == pytest.approx(100 / 3)
    assert [r["prediction"] for r in records] == ["北京", "在华北", "1976"]
    assert tokenizer.decode(backend.prompts[0]) == "北京是中国的首都，位于华北平原。问题：中国的首都是哪里？回答："
    assert tokenizer.decode(backend.prompts[1]).endswith("问题：北京位于哪里？回答：")   # "？" added
    long = questions[0].__class__("Q", "长" * 500, "问什么？", ("长",))
    ids = prompt_ids(tokenizer, long, 64)
    tail = tokenizer.encode("问题：问什么？回答：")
    assert len(ids) == 32 and ids[-len(tail):] == tail


# --------------------------------------------------------------------------- a tiny M6, end to end

def _zero_shot_rank(tmp: str) -> dict:
    """Save a tiny random M6; run every protocol through ModelBackend and examples/zero_shot.py."""
    from m6_engine.checkpoint import save_checkpoint
    from m6_engine.config import ModelConfig
    from m6_engine.data.tasks import SampleLayout
    from m6_engine.evaluate import ModelBackend
    from m6_engine.inference import GenerationConfig, Prompt, complete_text, generate, m6_prompt, score
    from m6_engine.model import M6Model
    from tests.distributed import init_state

    state = init_state()
    config = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_text_positions=64,
                         hidden_dropout=0.0, attention_dropout=0.0, init_std=0.2)
    model = M6Model(config, state, seed=3).eval()
    save_checkpoint(Path(tmp) / "ckpt", 1, model=model, state=state,
                    config={"model": config, "data": {"vocab_file": ""}})
    tok = BertWordPieceTokenizer(default_vocab_path())
    layout = SampleLayout.from_model(config, tok)
    backend = ModelBackend(model, layout, GenerationConfig(max_new_tokens=6), batch_size=2)
    out = {}
    masked = tok.encode("成语填空:前[MASK]后")
    texts = [tok.encode("前雷厉风行后"), tok.encode("前亡羊补牢后")]
    direct = [s.perplexity for s in score(model, Prompt(masked), [complete_text(layout, t) for t in texts])]
    out["ppl"] = (backend.perplexities(masked, texts), direct)
    prompts = [tok.encode(t) for t in ("问题：哪里？回答：", "北京是首都。问题：首都？回答：", "问？答：")]
    direct_gen = [list(g.tokens) for g in generate(model, [m6_prompt(layout, p) for p in prompts],
                                                    GenerationConfig(max_new_tokens=6), layout.sep_id)]
    out["gen"] = (backend.generate(prompts), direct_gen)

    spec = importlib.util.spec_from_file_location("zero_shot_cli", ROOT / "examples" / "zero_shot.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    runs = (("tnews", "tnews.json"), ("chid", "chid.json"), ("cmrc", "cmrc.json"), ("chid", "bad.json"))
    for task, data in runs:
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["--task", task, "--checkpoint", str(Path(tmp) / "ckpt"), "--data", str(Path(tmp) / data),
                "--out", str(Path(tmp) / f"{task}-{data}.jsonl"), "--max-new-tokens", "4"]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
        out[f"{task} {data}"] = (code, stdout.getvalue(), stderr.getvalue())
    return out


def test_model_end_to_end(tmp_path):
    _jsonl(tmp_path / "tnews.json", TNEWS)
    _jsonl(tmp_path / "chid.json", CHID)
    _jsonl(tmp_path / "bad.json", [CHID[0], CHID[1], {**CHID[2], "answer": -1}])
    (tmp_path / "cmrc.json").write_text(json.dumps(CMRC, ensure_ascii=False), encoding="utf-8")
    (out,) = run_ranks(_zero_shot_rank, 1, str(tmp_path), torchrun_env=False)
    assert np.allclose(*out["ppl"], rtol=1e-6) and all(p > 1 for p in out["ppl"][0])
    assert out["gen"][0] == out["gen"][1]
    for task, data, key in (("tnews", "tnews.json", "accuracy"), ("chid", "chid.json", "accuracy"),
                            ("cmrc", "cmrc.json", "f1")):
        code, stdout, stderr = out[f"{task} {data}"]
        assert code == 0, stderr
        metrics = json.loads(stdout)
        assert metrics["task"] == task and 0 <= metrics[key] <= (1 if key == "accuracy" else 100)
        lines = (tmp_path / f"{task}-{data}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == {"tnews": 5, "chid": 3, "cmrc": 3}[task]
        records = [json.loads(line) for line in lines]
        if task == "tnews":
            assert metrics["examples"] == 5 and len(records[0]["rounds"]) == 3
            assert metrics["accuracy"] == pytest.approx(np.mean([
                np.mean([r["rounds"][k]["prediction"] == r["label"] for r in records]) for k in range(3)]))
        if task == "chid":
            hits = [r["prediction"] == r["answer"] for r in records]
            assert metrics["accuracy"] == pytest.approx(np.mean(hits))
            assert all(r["prediction"] == int(np.argmin(r["perplexities"])) for r in records)
    code, stdout, stderr = out["chid bad.json"]
    assert code == 2 and "bad.json:3: answer -1 is not an index" in stderr and stdout == ""
    assert not (tmp_path / "chid-bad.json.jsonl").exists()
