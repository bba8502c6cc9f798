"""Bad generation inputs: ``python -m m6_engine.generate`` names the flag, the value and what is
allowed in one ``error:`` line and exits 2 before any process group; an unreadable image names the
file."""

import re

import pytest

from m6_engine import generate


@pytest.fixture
def run_main(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "ckpt").mkdir()

    def run(*flags):
        code = generate.main(["--checkpoint", str(tmp_path / "ckpt"), *flags])
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("flags, message", [
    (["--beams", "0"], "--beams must be >= 1, got 0"),
    (["--beams", "-3"], "--beams must be >= 1, got -3"),
    (["--sample"], "--sample needs --beams 1 (beam search is not sampled), got --beams 5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 disables), got -1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--no-repeat-ngram", "-2"], "--no-repeat-ngram must be >= 0 (0 disables), got -2"),
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--image", "{tmp}/cat.jpg"], "--image '{tmp}/cat.jpg': no such file"),
    (["--vocab", "{tmp}/vocab.txt"], "--vocab '{tmp}/vocab.txt': no such file"),
    (["--resnet-weights", "{tmp}/r50.pt"], "--resnet-weights '{tmp}/r50.pt': no such file"),
])
def test_bad_flag_is_one_error_line(run_main, tmp_path, flags, message):
    code, err = run_main(*[f.format(tmp=tmp_path) for f in flags])
    assert code == 2 and err == f"error: {message.format(tmp=tmp_path)}\n", err


def test_missing_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    missing = str(tmp_path / "nothing")
    assert generate.main(["--checkpoint", missing]) == 2
    assert capsys.readouterr().err == (f"error: --checkpoint {missing!r}: no such checkpoint folder "
                                       "or directory\n")


def test_non_integer_beams_is_an_argparse_error(run_main, capsys):
    with pytest.raises(SystemExit) as info:
        run_main("--beams", "five")
    assert info.value.code == 2
    assert "argument --beams: invalid int value: 'five'" in capsys.readouterr().err


def test_file_that_is_not_an_image_names_the_file(tmp_path):
    from m6_engine.data.vision import ExtractorConfig, ImageRejected
    from m6_engine.inference.loading import image_features

    path = tmp_path / "notes.jpg"
    path.write_text("not an image", encoding="utf-8")
    with pytest.raises(ImageRejected, match=re.escape(f"{path}: unreadable: UnidentifiedImageError")):
        image_features(str(path), ExtractorConfig(name="pixels"))
