"""The WordPiece tokenizer against Hugging Face's ``BertTokenizer``, id for id; the vocab builder;
the default-vocab install step (vocab_fetch).

Reference: ``transformers.BertTokenizer`` (a test dependency), built on the same ``vocab.txt``.
Our tokenizer treats a literal ``"[MASK]"`` in the text as plain text, so it is compared with
``tokenize(text, split_special_tokens=True)`` (the same as without it on text holding none).
"""

import hashlib
import random
import subprocess
import unicodedata
import zipfile
from pathlib import Path

import pytest
import regex
import transformers

from m6_engine.data import build_vocab, tokenizer, vocab_fetch
from m6_engine.data.tokenizer import BertWordPieceTokenizer, basic_tokenize

WOAI = "我爱北京天安门"
WOAI_IDS = [2769, 4263, 1266, 776, 1921, 2128, 7305]

# Texts of every kind the issue names (and the edge cases of the algorithm).
CASES = [
    "", " ", "\t\n\r  \u3000", WOAI, "我爱北京天安门，天安门上太阳升。",
    "The quick brown fox jumps over the lazy dog.", "Hello, World! HELLO world?",
    "机器学习 machine learning 和深度学习 deep learning 在2021年发展迅速！",
    "12345 3.14159 -42 1,000,000 ２０２１年 ①②③ 100%",
    "😀 😂👍🏽 👨‍👩‍👧 🇨🇳 ❤️ 表情😀符号", "（全角）【括号】「引号」『书名』《书》：；！？、，。——……",
    "ＡＢＣ ａｂｃ ＦｕｌｌＷｉｄｔｈ", "ctrl\x00a\x01b\x7fc\x85d\x0be\x0cf\u200bg\u200dh\ufeffi\ufffdj",
    "private\ue000use \U000f0000 unassigned\u0378here", "line\u2028sep\u2029para\u00a0nbsp\u3000ideo",
    "Café naïve résumé ÉLAN Ångström ŞİŞLİ İstanbul", "e\u0301 a\u0308 combining\u0301\u0302 marks",
    "ΟΔΟΣ ΣΟΦΟΣ Σ σ ς", "ǅ ǈ ǋ ﬁ ß ẞ", "日本語のテキスト カタカナ ひらがな 한국어 텍스트", "Ⅻ ㈱ ㍻ ㋿ ＄￥€",
    "a" * 100, "a" * 101, "我" + "a" * 101 + "你", "tokenization " * 3 + "x" * 150,
    "[MASK] [CLS]北京[SEP] [PAD][UNK] [mask]", "## ##ab a##b #", "\U00020000\U0002a700\uf900\u2f00\u3400",
    "𝐀𝐁𝐂 𝟏𝟐𝟑 \U00011938 \u1734 \U0001171e \u166d", "漢字" * 40, "漢字，" * 40 + "end",
    "北京 " * 30 + "abc" + "。" * 20,
]


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_vocab(tmp_path_factory):
    """The real bert-base-chinese vocab: the installed one, else fetched into a temporary folder."""
    try:
        return str(tokenizer.default_vocab_path())
    except FileNotFoundError:
        dest = tmp_path_factory.mktemp("vocab") / "vocab.txt"
        try:
            vocab_fetch.fetch_vocab(dest)
        except vocab_fetch.VocabFetchError as e:
            pytest.skip(f"the default vocab is not installed and cannot be fetched here: {e}")
        return str(dest)


CORPUS = [
    "我爱北京天安门，天安门上太阳升。北京是中国的首都。",
    "机器学习 machine learning 和深度学习 deep learning 在 2021 年发展迅速！",
    "Tokenization tokenizes tokens: token, tokens, tokenizer, tokenizers.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps. Dogs and foxes.",
    "Café naïve résumé, ÉLAN 1234567 and 3.14159 😀😀 ＡＢＣ（全角）【括号】",
] * 3


@pytest.fixture(scope="module")
def built_vocab(tmp_path_factory):
    """A small vocab made by build_vocab (its command line) from a corpus written here."""
    d = tmp_path_factory.mktemp("built")
    (d / "corpus.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    assert build_vocab.main(["--input", str(d / "corpus.txt"), "--size", "180",
                             "--out", str(d / "vocab.txt")]) == 0
    return str(d / "vocab.txt")


@pytest.fixture(scope="module", params=["default", "built"])
def vocab(request):
    return request.getfixturevalue(f"{request.param}_vocab")


def hf_tokenizer(vocab_file: str, lower_case: bool):
    # transformers 5 takes the vocab as `vocab=` (a path or dict) and ignores `vocab_file=`;
    # callers check the vocab size so an ignored vocab cannot pass unnoticed.
    return transformers.BertTokenizer(vocab=vocab_file, do_lower_case=lower_case,
                                      tokenize_chinese_chars=True)


def hf_ids(hf, text):
    return hf.convert_tokens_to_ids(hf.tokenize(text, split_special_tokens=True))


def hf_words(hf, text):
    """Hugging Face's words before WordPiece: its normaliser, then its pre-tokenizer."""
    backend = hf.backend_tokenizer
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]


@pytest.fixture(scope="module", params=[True, False], ids=["lower", "cased"])
def pair(request, vocab):
    """(ours, Hugging Face's) on the same vocab and case setting."""
    ours = BertWordPieceTokenizer(vocab, lower_case=request.param)
    hf = hf_tokenizer(vocab, request.param)
    assert hf.vocab_size == ours.vocab_size, "Hugging Face did not load the vocab file"
    return ours, hf


# ---- equality with Hugging Face ---------------------------------------------------------------

def test_paper_example(default_vocab):
    tok = BertWordPieceTokenizer(default_vocab)
    assert tok.encode(WOAI) == WOAI_IDS
    assert tok.tokenize(WOAI) == list(WOAI)
    assert tok.vocab_size == 21128
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)


@pytest.mark.parametrize("text", CASES)
def test_cases_match_hugging_face(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf_ids(hf, text)
    assert ours.tokenize(text) == hf.convert_ids_to_tokens(hf_ids(hf, text))


def _random_text(rng: random.Random) -> str:
    # Pools weighted towards what corpora hold, plus the whole code space.
    pools = [(0x20, 0x7F), (0x80, 0x250), (0x250, 0x2000), (0x2000, 0x3100), (0x4E00, 0xA000),
             (0xAC00, 0xD7A4), (0xF900, 0xFB00), (0xFF00, 0xFFF0), (0x1F300, 0x1FB00), (0x20000, 0x2FA20),
             (0, 0x110000)]
    chars = []
    for _ in range(rng.choice([0, 1, 5, 20, 80, 300])):
        lo, hi = rng.choice(pools)
        c = rng.randrange(lo, hi)
        chars.append(" " if 0xD800 <= c <= 0xDFFF else chr(c))
    return "".join(chars)


def test_random_unicode_matches_hugging_face(pair):
    ours, hf = pair
    rng = random.Random(1234)
    for _ in range(600):
        text = _random_text(rng)
        assert ours.encode(text) == hf_ids(hf, text), repr(text)
    # Long texts of only CJK and punctuation: the table fast path, unknown characters included.
    for _ in range(50):
        points = [rng.choice([rng.randrange(0x4E00, 0xA000), rng.randrange(0x3000, 0x3040),
                              rng.randrange(0x20000, 0x2A6E0), 0x3002, 0x20]) for _ in range(200)]
        text = "".join(map(chr, points))
        assert ours.encode(text) == hf_ids(hf, text), repr(text)


def _code_points_to_check():
    """Every assigned code point; of the unassigned and private-use ones (each a class that is
    handled alike throughout, 940k of them) every 61st."""
    alike = regex.compile(r"[\p{Cn}\p{Co}]")
    return [chr(c) for c in range(0x110000)
            if not 0xD800 <= c <= 0xDFFF and (c % 61 == 0 or not alike.match(chr(c)))]


@pytest.mark.parametrize("lower_case", [True, False], ids=["lower", "cased"])
def test_every_code_point_matches_hugging_face(default_vocab, lower_case):
    """Each code point inside a word, after a capital and doubled alone: the same words as
    Hugging Face's normaliser + pre-tokenizer (4096 code points per comparison), and encode's
    fast path gives the ids of those words."""
    hf = hf_tokenizer(default_vocab, lower_case)
    ours = BertWordPieceTokenizer(default_vocab, lower_case=lower_case)
    chars = _code_points_to_check()
    for start in range(0, len(chars), 4096):
        block = chars[start:start + 4096]
        text = "".join(f"a{c}b Z{c} {c}{c} " for c in block)
        words = basic_tokenize(text, lower_case)
        # encode's table path (long text) agrees with WordPiece over the reference words
        assert ours.encode(text) == [i for w in words for i in ours._word_ids(w)]
        if words != hf_words(hf, text):
            alone = [f"a{c}b Z{c} {c}{c}" for c in block]
            bad = [f"U+{ord(c):04X}" for c, t in zip(block, alone)
                   if basic_tokenize(t, lower_case) != hf_words(hf, t)]
            pytest.fail(f"differs from Hugging Face at {bad[:20]} "
                        f"(unicodedata {unicodedata.unidata_version})")


def test_one_char_word_table_matches_hugging_face(default_vocab):
    """Every CJK / punctuation code point through the table path (long texts of only those)."""
    hf = hf_tokenizer(default_vocab, True)
    ours = BertWordPieceTokenizer(default_vocab)
    points = tokenizer._one_char_word_code_points().tolist()
    for i in range(0, len(points), 2000):
        text = " ".join(chr(c) for c in points[i:i + 2000])
        assert ours.encode(text) == hf_ids(hf, text), f"block from U+{points[i]:04X}"


# ---- behaviour ----------------------------------------------------------------------------------

def test_long_words_are_unk(default_vocab):
    tok = BertWordPieceTokenizer(default_vocab)
    assert tok.encode("a" * 101) == [tok.unk_id]
    assert tok.unk_id not in tok.encode("a" * 100)
    assert tok.encode("我" + "a" * 101 + "。") == [tok.token_to_id("我"), tok.unk_id, tok.token_to_id("。")]


def test_special_token_strings_are_plain_text(default_vocab):
    tok = BertWordPieceTokenizer(default_vocab)
    assert tok.tokenize("[MASK]") == ["[", "ma", "##sk", "]"]
    assert tok.mask_id not in tok.encode("[MASK] [CLS] [SEP] [PAD]")


def test_cache_limit_keeps_results(default_vocab, monkeypatch):
    monkeypatch.setattr(tokenizer, "_CACHE_LIMIT", 3)
    tok = BertWordPieceTokenizer(default_vocab)
    text = "alpha beta gamma delta epsilon zeta alpha beta"
    first = tok.encode(text)
    assert len(tok._cache) == 3
    assert tok.encode(text) == first == BertWordPieceTokenizer(default_vocab).encode(text)


def test_decode(default_vocab):
    tok = BertWordPieceTokenizer(default_vocab)
    assert tok.decode(tok.encode(WOAI)) == WOAI
    assert tok.decode(tok.encode("我爱北京天安门，天安门上太阳升。")) == "我爱北京天安门，天安门上太阳升。"
    assert tok.decode(tok.encode("Tokenization works, doesn't it? (yes) [ok]")) == \
        "tokenization works, doesn ' t it? (yes) [ok]"
    assert tok.decode(tok.encode("我爱 python 编程2021年")) == "我爱python编程2021年"
    ids = [tok.cls_id] + tok.encode(WOAI) + [tok.sep_id, tok.pad_id]
    assert tok.decode(ids) == "[CLS]我爱北京天安门[SEP] [PAD]"
    assert tok.decode(ids, skip_special_tokens=True) == WOAI
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="21128"):
        tok.decode([21128])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_special_ids_follow_the_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["x", "[MASK]", "[SEP]", "[CLS]", "[UNK]", "[PAD]", "y", "##y"]) + "\n",
                    encoding="utf-8")
    tok = BertWordPieceTokenizer(path)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (5, 4, 3, 2, 1)
    assert tok.vocab_size == 8
    assert tok.encode("yy x z") == [6, 7, 0, 4]
    with pytest.raises(KeyError, match="'z' is not in the vocab"):
        tok.token_to_id("z")


# ---- bad vocab files ----------------------------------------------------------------------------

SPECIALS = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (SPECIALS.encode() + b"a\nb\na\n", r"token 'a' on line 8 duplicates line 6"),
    (b"[PAD]\n[UNK]\n[CLS]\n[MASK]\nx\n", r"lacks the special token\(s\) \[SEP\]"),
    (SPECIALS.encode() + b"a\n\nb\n", "line 7 is empty"),
    (SPECIALS.encode() + b"\xff\xfe\n", "is not UTF-8"),
], ids=["empty", "duplicate", "no-sep", "empty-line", "not-utf8"])
def test_bad_vocab_errors(tmp_path, content, message):
    path = tmp_path / "bad_vocab.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        BertWordPieceTokenizer(path)
    assert str(path) in str(info.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        BertWordPieceTokenizer(tmp_path / "nowhere.txt")


def test_crlf_vocab_loads(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(SPECIALS.replace("\n", "\r\n").encode() + b"a\r\n")
    assert BertWordPieceTokenizer(path).encode("a") == [5]


def test_default_vocab_path_says_make_install(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab_fetch, "DEFAULT_VOCAB_PATH", tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="run `make install`"):
        tokenizer.default_vocab_path()
    (tmp_path / "vocab.txt").write_text(SPECIALS, encoding="utf-8")
    with pytest.raises(ValueError, match="md5"):
        tokenizer.default_vocab_path()


# ---- build_vocab --------------------------------------------------------------------------------

def test_build_vocab_format(built_vocab):
    tokens = tokenizer.read_vocab(built_vocab)  # no duplicates, all specials (else it raises)
    assert tokens[:5] == list(tokenizer.SPECIAL_TOKENS)
    assert len(tokens) == 180
    words = build_vocab.count_words(CORPUS, lower_case=True)
    alphabet = build_vocab.alphabet(words)
    assert tokens[5:5 + len(alphabet)] == alphabet
    assert {"我", "，", "。", "！", "（", "😀"} <= set(alphabet) and "##o" in alphabet
    assert all(len(t) == 1 for t in alphabet if not t.startswith("##"))
    assert any(len(t) > 3 for t in tokens[5 + len(alphabet):])  # merged pieces follow
    tok = BertWordPieceTokenizer(built_vocab)
    for line in CORPUS:
        assert tok.unk_id not in tok.encode(line), line


def test_build_vocab_is_reproducible(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(CORPUS[:3]), encoding="utf-8")
    b.write_text("\n".join(CORPUS[3:]), encoding="utf-8")
    outs = []
    for i, inputs in enumerate([[a, b], [a, b], [b, a]]):
        out = tmp_path / f"vocab{i}.txt"
        assert build_vocab.main(["--input", *map(str, inputs), "--size", "150", "--out", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_build_vocab_merges_by_frequency():
    counts = {"lower": 5, "lowest": 2, "newer": 6, "wider": 3}
    vocab = build_vocab.build_vocab(counts, size=100)
    pieces = vocab[5 + len(build_vocab.alphabet(counts)):]
    # ("##e", "##r") is the commonest pair (14), then ("##w", "##er") (11) and ("l", "##o") (7).
    assert pieces[:3] == ["##er", "##wer", "lo"]
    assert set(vocab) >= {"lower", "newer"}


def test_build_vocab_cased_and_size_errors(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello HELLO hello\n", encoding="utf-8")
    out = tmp_path / "v.txt"
    assert build_vocab.main(["--input", str(corpus), "--size", "50", "--out", str(out), "--cased"]) == 0
    assert {"H", "h", "##E", "##e"} <= set(tokenizer.read_vocab(out))
    assert build_vocab.main(["--input", str(corpus), "--size", "6", "--out", str(tmp_path / "w.txt")]) == 1
    assert "--size 6 is below" in capsys.readouterr().err
    assert not (tmp_path / "w.txt").exists()
    with pytest.raises(SystemExit):
        build_vocab.main(["--input", str(tmp_path / "missing.txt"), "--size", "50", "--out", str(out)])


def test_build_vocab_cli_matches_hugging_face(built_vocab):
    hf = hf_tokenizer(built_vocab, True)
    ours = BertWordPieceTokenizer(built_vocab)
    for text in CORPUS + CASES:
        assert ours.encode(text) == hf_ids(hf, text), repr(text)


# ---- vocab_fetch --------------------------------------------------------------------------------

VOCAB_BYTES = (SPECIALS + "我\n爱\n").encode("utf-8")


def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("fake-1.0.dist-info/METADATA", "Name: fake\n")
    return path


def _source(data: bytes = VOCAB_BYTES) -> vocab_fetch.VocabSource:
    return vocab_fetch.VocabSource("fake==1.0", "fake/vocab.txt", hashlib.md5(data).hexdigest())


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Replace `pip download` by a copy of a wheel built here; returns the list of calls made."""
    calls = []

    def install(data: bytes, member: str = "fake/vocab.txt"):
        wheel = _fake_wheel(tmp_path / "fake-1.0-py3-none-any.whl", member, data)

        def download(requirement, into_dir):
            calls.append(requirement)
            target = Path(into_dir) / wheel.name
            target.write_bytes(wheel.read_bytes())
            return target

        monkeypatch.setattr(vocab_fetch, "download_wheel", download)
        return calls

    return install


def test_fetch_installs_then_is_idempotent(tmp_path, fake_download):
    calls = fake_download(VOCAB_BYTES)
    dest = tmp_path / "pkg" / "_data" / "vocab.txt"
    assert vocab_fetch.fetch_vocab(dest, _source()) is True
    assert dest.read_bytes() == VOCAB_BYTES and calls == ["fake==1.0"]
    assert vocab_fetch.fetch_vocab(dest, _source()) is False  # already there: no download
    assert calls == ["fake==1.0"]
    assert BertWordPieceTokenizer(dest).encode("我爱") == [5, 6]


def test_fetch_refuses_a_wrong_md5(tmp_path, fake_download):
    fake_download(VOCAB_BYTES + b"tampered\n")
    dest = tmp_path / "vocab.txt"
    with pytest.raises(vocab_fetch.VocabFetchError, match="md5 .* expected"):
        vocab_fetch.fetch_vocab(dest, _source())
    assert [p.name for p in tmp_path.iterdir()] == ["fake-1.0-py3-none-any.whl"]  # no vocab, no temporary
    dest.write_bytes(b"old")
    with pytest.raises(vocab_fetch.VocabFetchError):
        vocab_fetch.fetch_vocab(dest, _source())
    assert dest.read_bytes() == b"old"


def test_fetch_replaces_a_stale_file(tmp_path, fake_download):
    fake_download(VOCAB_BYTES)
    dest = tmp_path / "vocab.txt"
    dest.write_bytes(b"stale")
    assert vocab_fetch.fetch_vocab(dest, _source()) is True
    assert dest.read_bytes() == VOCAB_BYTES


def test_fetch_wheel_without_the_member(tmp_path, fake_download):
    fake_download(VOCAB_BYTES, member="elsewhere/vocab.txt")
    with pytest.raises(vocab_fetch.VocabFetchError, match="has no member 'fake/vocab.txt'"):
        vocab_fetch.fetch_vocab(tmp_path / "vocab.txt", _source())


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(vocab_fetch.subprocess, "run", failing_run)
    with pytest.raises(vocab_fetch.VocabFetchError, match="(?s)exit 1.*No matching distribution"):
        vocab_fetch.download_wheel("cn-clip==1.6.0", tmp_path)


def test_fetch_cli_error_exit(tmp_path, fake_download, capsys):
    fake_download(b"wrong", member=vocab_fetch.DEFAULT_SOURCE.member)
    assert vocab_fetch.main(["--dest", str(tmp_path / "vocab.txt")]) == 1
    assert "expected 3b5b76c4aef48ecf8cb3abaafe960f09" in capsys.readouterr().err


def test_installed_default_vocab_needs_no_download(monkeypatch):
    try:
        path = tokenizer.default_vocab_path()
    except FileNotFoundError:
        pytest.skip("the default vocab is not installed (`make install` installs it)")

    def no_download(*args):
        raise AssertionError("downloaded although the vocab is installed")

    monkeypatch.setattr(vocab_fetch, "download_wheel", no_download)
    assert vocab_fetch.fetch_vocab(path) is False
