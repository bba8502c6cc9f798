"""Zero-shot evaluation of M6 on the paper's NLP tasks (§4.1.2, tables 7 and 8).

``tnews`` (news classification by lowest-perplexity label), ``chid`` (idiom cloze as text
denoising), ``cmrc`` (reading comprehension by generation, F1 / EM). Each reads its task's real
file format (errors name the file and line), builds the paper's template and returns
(metrics, per-example records); a :class:`~m6_engine.evaluate.backend.Backend` supplies
perplexities and generations (``ModelBackend`` for an M6 model). ``examples/zero_shot.py`` runs them.
"""

from m6_engine.evaluate.backend import Backend, ModelBackend
from m6_engine.evaluate.chid import evaluate_chid, read_chid
from m6_engine.evaluate.cmrc import evaluate_cmrc, exact_match, f1_score, read_cmrc
from m6_engine.evaluate.records import DataFormatError, read_json_lines, write_predictions
from m6_engine.evaluate.tnews import LABEL_WORDS, evaluate_tnews, load_label_words, read_tnews

__all__ = [
    "Backend", "DataFormatError", "LABEL_WORDS", "ModelBackend", "evaluate_chid", "evaluate_cmrc",
    "evaluate_tnews", "exact_match", "f1_score", "load_label_words", "read_chid", "read_cmrc",
    "read_json_lines", "read_tnews", "write_predictions",
]
