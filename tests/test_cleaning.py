"""Cleaning rules on crafted documents, alone and chained; dedup; the streaming pipeline and its report."""

import json
import math

import numpy as np
import pytest

from m6_engine.data import clean, cleaning, dedup
from m6_engine.data.cleaning import CleaningConfig, ParseError, PerplexityFilter
from m6_engine.data.dedup import DedupConfig, MinHasher, NearDuplicateIndex

LONG = "今天我们在公园里散步，看到了很多美丽的花朵和高大的树木。"  # 28 characters


# ---- each rule alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("<p>你好</p><br/>世界", " 你好  世界"),
    ("a<script type='x'>var s = '<b>';</script>b", "a b"),
    ("x<!-- 注释 <p> -->y<STYLE>p{}</STYLE>z", "x y z"),
    ("&lt;b&gt; &amp; &#x4e2d;&#25991; &nbsp;", "<b> & 中文 \xa0"),
    ("1 < 2 and 3 > 2", "1 < 2 and 3 > 2"),  # not markup
    ("没有标签", "没有标签"),
])
def test_strip_html(raw, expected):
    assert cleaning.strip_html(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("中文English123，。！？“”《》", "中文English123，。！？“”《》"),
    ("表情😀符号★和한국어以及русский", "表情符号和以及"),
    ("  多个   空白\t\n和\xa0不换行  ", "多个 空白 和 不换行"),
    ("全角１２３ＡＢＣ和〇", "全角１２３ＡＢＣ和〇"),
    ("控制\x00字符\x07", "控制字符"),
])
def test_keep_charset(raw, expected):
    assert cleaning.keep_charset(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("好！！！！", "好！"), ("什么？？", "什么？"), ("等等……………", "等等……"), ("破折——————号", "破折——号"),
    ("wow!!!", "wow!"), ("a...b", "a.b"), ("不同！？", "不同！？"), ("1,000,000", "1,000,000"), ("一。", "一。"),
])
def test_collapse_punctuation(raw, expected):
    assert cleaning.collapse_punctuation(raw) == expected


def test_min_length_rules():
    title = cleaning.MinLength("t", "title", 5)
    content = cleaning.MinLength("c", "content", 15)
    assert title({"title": "四个字符", "content": LONG}) is None
    assert title({"title": "五个字符啊", "content": LONG}) is not None
    assert title({"content": LONG}) is not None  # no title: nothing to check
    assert content({"content": LONG[:14]}) is None
    assert content({"content": LONG[:15]}) is not None
    with pytest.raises(ValueError, match="min_chars"):
        cleaning.MinLength("c", "content", -1)


def test_word_list_matching(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment line\n\n坏词\nBadWord\n", encoding="utf-8")
    words = cleaning.read_word_list(path)
    assert words == ["坏词", "badword"]
    wl = cleaning.WordList(words, ("title", "content"))
    assert wl({"content": "这里有一个坏词在中间"}) is None
    assert wl({"title": "标题有 BADWORD 啊", "content": LONG}) is None  # any field, any case
    assert wl({"content": "badwords is another word"}) is not None  # ASCII: whole words only
    assert wl({"content": "这是badword吗"}) is None  # next to Chinese characters it is a whole word
    assert wl({"content": LONG}) is not None
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no words"):
        cleaning.read_word_list(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        cleaning.read_word_list(tmp_path / "missing.txt")


@pytest.mark.parametrize("raw, reason", [
    (b'{"content": "\xff\xfe"}', "bad_utf8"),
    (b'{"content": ', "bad_json"),
    (b'[1, 2]', "not_object"),
    (b'{"title": "t"}', "missing_content"),
    (b'{"content": 5}', "bad_field_type"),
    (b'{"content": "ok text", "image": 3}', "bad_field_type"),
    (b'{"content": "   "}', "empty_field"),
    (b'{"title": "", "content": "ok"}', "empty_field"),
])
def test_parse_line_reasons(raw, reason):
    with pytest.raises(ParseError) as e:
        cleaning.parse_line(raw)
    assert e.value.reason == reason


# ---- rules together ------------------------------------------------------------------------------

def test_chain_counts_each_rule():
    chain = cleaning.build_filters(CleaningConfig())
    stats = chain.new_stats()
    docs = [
        {"title": "<b>好标题啊啊</b>", "content": "<p>正文！！！" + LONG + "😀</p>", "id": 7},
        {"title": "短", "content": LONG},
        {"content": "<i>太短了</i>"},
        {"content": LONG},
    ]
    out = [chain(d, stats) for d in docs]
    assert out[0] == {"title": "好标题啊啊", "content": "正文！" + LONG, "id": 7}
    assert out[1] is None and out[2] is None and out[3] == docs[3]
    # each tag pair (7 characters) becomes two spaces: 5 characters less, in 3 fields of 2 documents
    assert stats["html"].changed == 2 and stats["html"].chars_removed == 3 * 5
    # the emoji and the six spaces html left at the ends of the three fields
    assert stats["charset"].changed == 2 and stats["charset"].chars_removed == 1 + 6
    assert stats["punctuation"].changed == 1 and stats["punctuation"].chars_removed == 2
    assert (stats["min_title_length"].seen, stats["min_title_length"].dropped) == (4, 1)
    assert (stats["min_content_length"].seen, stats["min_content_length"].dropped) == (3, 1)
    assert "word_list" not in stats


def test_charset_then_punctuation_order():
    # Deleting the star makes a repeat, which the later punctuation rule collapses.
    chain = cleaning.build_filters(CleaningConfig(min_content_chars=0))
    assert chain({"content": "好！★！"}, chain.new_stats())["content"] == "好！"


# ---- dedup ---------------------------------------------------------------------------------------

def test_exact_key_ignores_case_and_whitespace():
    assert dedup.exact_key("Hello  世界\n") == dedup.exact_key("hello世界")
    assert dedup.exact_key("hello世界") != dedup.exact_key("hello世界!")


def test_minhash_deterministic_and_estimates_jaccard():
    cfg = DedupConfig(num_perm=256, bands=32)
    a, b = MinHasher(cfg), MinHasher(cfg)
    text1 = "".join(chr(0x4E00 + i) for i in range(300))
    text2 = text1[:200] + "".join(chr(0x5E00 + i) for i in range(100))
    assert np.array_equal(a.signature(text1), b.signature(text1))
    assert not np.array_equal(a.signature(text1), MinHasher(DedupConfig(seed=1, num_perm=256, bands=32))
                              .signature(text1))
    s1 = set(text1[i:i + 5] for i in range(len(text1) - 4))
    s2 = set(text2[i:i + 5] for i in range(len(text2) - 4))
    true_j = len(s1 & s2) / len(s1 | s2)
    est = dedup.estimated_jaccard(a.signature(text1), a.signature(text2))
    assert abs(est - true_j) < 0.1, (est, true_j)


def test_near_duplicate_index():
    cfg = DedupConfig()
    hasher, index = MinHasher(cfg), NearDuplicateIndex(cfg)
    base = LONG * 4
    assert index.check_and_add(hasher.signature(base)) is None
    assert index.check_and_add(hasher.signature("完全不同的另一段文字，讲的是天气和城市的交通情况。" * 3)) is None
    assert index.check_and_add(hasher.signature(base[:-1] + "！")) == 0  # one character changed
    assert len(index) == 2


def test_dedup_config_checks():
    with pytest.raises(ValueError, match="divide"):
        DedupConfig(num_perm=100, bands=16)
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0.0)


# ---- perplexity ----------------------------------------------------------------------------------

def test_perplexity_filter_drops_worst_fraction():
    flt = PerplexityFilter(scorer=len, drop_fraction=0.25)
    mask = flt.dropped([1.0, 9.0, 3.0, math.inf, 5.0, 9.0, 2.0, float("nan")])
    # k = 2: the two non-finite scores are the worst
    assert mask.tolist() == [False, False, False, True, False, False, False, True]
    mask = flt.dropped([1.0, 9.0, 3.0, 9.0])  # k = 1: of the tied 9s the later goes
    assert mask.tolist() == [False, False, False, True]
    assert (flt.stats.seen, flt.stats.dropped) == (12, 3)
    assert flt.score("abc") == 3.0
    with pytest.raises(ValueError, match="drop_fraction"):
        PerplexityFilter(scorer=len, drop_fraction=1.0)


def make_length_scorer(scale=None):
    """A scorer factory for load_scorer: perplexity = length x scale."""
    return lambda text: len(text) * float(scale or 1)


def make_not_a_scorer():
    return 5


def test_load_scorer_spec():
    assert clean.load_scorer("tests.test_cleaning:make_length_scorer", None)("abc") == 3.0
    assert clean.load_scorer("tests.test_cleaning:make_length_scorer", "2")("abc") == 6.0
    with pytest.raises(ValueError, match="MODULE:FACTORY"):
        clean.load_scorer("no_colon", None)
    with pytest.raises(ValueError, match="has no"):
        clean.load_scorer("math:no_such_factory", None)
    with pytest.raises(ValueError, match="not a text -> perplexity callable"):
        clean.load_scorer("tests.test_cleaning:make_not_a_scorer", None)


# ---- the pipeline --------------------------------------------------------------------------------

def _write_raw(path, docs, extra_lines=()):
    with open(path, "wb") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")


def _corpus():
    texts = [f"第{i}篇：" + "".join(chr(0x4E00 + (i * 37 + j * 11) % 5000) for j in range(40)) for i in range(30)]
    docs = [{"id": i, "content": t} for i, t in enumerate(texts)]
    docs.append({"id": 100, "content": texts[3]})  # exact duplicate
    docs.append({"id": 101, "content": "  " + texts[4][:-1] + "啊"})  # near duplicate
    docs.append({"id": 102, "title": "短", "content": texts[5] + "x"})  # short title
    docs.append({"id": 103, "content": "<p>太短</p>"})  # short content after html
    docs.append({"id": 104, "image": "img/a.png", "content": texts[6]})  # same text, with an image: kept
    docs.append({"id": 105, "image": "img/a.png", "content": texts[6]})  # same pair: exact duplicate
    bad = [b'{"content": "\xff bad"}', b"{not json", b"[]", b'{"content": ""}']
    return docs, bad


@pytest.mark.timeout(120)
def test_clean_files_report_and_output(tmp_path):
    docs, bad = _corpus()
    src = tmp_path / "raw" / "in.jsonl"
    src.parent.mkdir()
    _write_raw(src, docs, bad)
    out1, out2 = tmp_path / "o1" / "clean.jsonl", tmp_path / "o2" / "clean.jsonl"
    r1 = clean.clean_files([src], out1, workers=1, chunk_lines=7, progress=False)
    r2 = clean.clean_files([src], out2, workers=2, chunk_lines=7, progress=False)
    assert out1.read_bytes() == out2.read_bytes()  # independent of the worker count
    assert r1.as_dict() == r2.as_dict()
    kept = [json.loads(line) for line in out1.read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in kept] == list(range(30)) + [104]
    assert kept[-1]["image"] == "../raw/img/a.png"  # still points at raw/img/a.png from o1/
    assert r1.lines == len(docs) + len(bad) and r1.kept == 31
    assert {k: v for k, v in r1.parse_errors.items() if v} == {"bad_utf8": 1, "bad_json": 1, "not_object": 1,
                                                              "empty_field": 1}
    f = r1.filters
    assert (f["min_title_length"].dropped, f["min_content_length"].dropped) == (1, 1)
    assert (f["exact_dedup"].seen, f["exact_dedup"].dropped) == (34, 2)
    assert (f["near_dedup"].seen, f["near_dedup"].dropped) == (31, 1)  # text-only docs: image pairs are not
    assert f["html"].changed == 1
    assert not list(tmp_path.glob("o*/.*.tmp"))


@pytest.mark.timeout(60)
def test_clean_files_perplexity_and_word_list(tmp_path):
    docs, _ = _corpus()
    src = tmp_path / "in.jsonl"
    _write_raw(src, docs[:30])
    words = tmp_path / "words.txt"
    words.write_text(docs[0]["content"][4:8] + "\n", encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    scores = {d["content"]: float(d["id"]) for d in docs[:30]}  # later documents are "worse"
    report = clean.clean_files([src], out, CleaningConfig(word_list=str(words)),
                               perplexity=PerplexityFilter(scores.__getitem__, 0.2), progress=False)
    kept = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert 0 not in kept and report.filters["word_list"].dropped == 1
    assert kept == list(range(1, 25))  # 29 survivors, floor(0.2 * 29) = 5 worst (ids 25..29) dropped
    assert report.filters["perplexity"].dropped == 5 and report.kept == 24


def test_clean_cli(tmp_path, capsys):
    docs, bad = _corpus()
    src = tmp_path / "in.jsonl"
    _write_raw(src, docs, bad)
    out, rep = tmp_path / "clean.jsonl", tmp_path / "report.json"
    assert clean.main(["--input", str(src), "--output", str(out), "--report", str(rep), "--no-progress",
                       "--no-near-dedup"]) == 0
    report = json.loads(rep.read_text())
    assert report["kept"] == 32 and "near_dedup" not in report["filters"]
    assert "documents kept" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        clean.clean_files([tmp_path / "nope.jsonl"], out, progress=False)


def test_pair_dedup_compares_image_files_not_spellings(tmp_path):
    caption = {"content": LONG}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _write_raw(tmp_path / folder / "in.jsonl", [{**caption, "image": "img/x.png"},
                                                    {**caption, "image": "sub/../img/x.png"}])
    out = tmp_path / "clean.jsonl"
    report = clean.clean_files([tmp_path / "a" / "in.jsonl", tmp_path / "b" / "in.jsonl"], out, progress=False)
    kept = [json.loads(line)["image"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == ["a/img/x.png", "b/img/x.png"]  # same caption, two image files: two pairs
    assert report.filters["exact_dedup"].dropped == 2  # the second spelling of each file
