"""What a model reads its samples with: the tokenizer's vocabulary and the extractor of its image
features. A checkpoint records both, so that what uses the model later reads the same inputs.

A model is only meaningful on inputs made the way its training corpus was: token ids from the same
vocabulary, patch features from the same extractor. The corpus's ``<prefix>_meta.json``
(:mod:`m6_engine.data.preprocess`) says how it was made. The Trainer records the training corpus's
:class:`ModelInputs` in every checkpoint's manifest (``"inputs"``) and stores the vocabulary file
itself beside the shards (:data:`VOCAB_FILE`); ``generate`` and finetuning (``train.init_from``)
read them back and refuse an explicit choice that differs, instead of running on other features
without a word.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from m6_engine.config import ConfigError
from m6_engine.data.dataset import DatasetError

VOCAB_FILE = "vocab.txt"
"""The vocabulary's name in a checkpoint folder (covered by the manifest's digests)."""


@dataclass(frozen=True)
class ModelInputs:
    """How the samples of a model's training corpus were made."""

    vocab_hash: str
    """Fingerprint of the tokenizer (vocabulary entries and casing), hex."""
    extractor: dict | None
    """The ``ExtractorConfig`` fields the corpus's image features were made with; None when the
    corpus has no images or its metadata does not say."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelInputs | None":
        """The inputs a checkpoint manifest records; None for checkpoints saved before they were."""
        inputs = manifest.get("inputs")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("vocab_hash"), str):
            return None
        extractor = inputs.get("extractor")
        return cls(inputs["vocab_hash"], extractor if isinstance(extractor, dict) else None)


def extractor_identity(fields: dict) -> tuple:
    """What makes two extractors give the same features (not where they run, nor where their
    weights file sits on this machine)."""
    name = fields.get("name")
    if name == "resnet50":
        if fields.get("random_weights"):
            return name, "random", fields.get("seed", 0)
        return name, "weights", os.path.basename(fields.get("weights") or "")
    return name, fields.get("pixels_grid", 14)


def describe_extractor(fields: dict | None) -> str:
    """The extractor for an error message."""
    if fields is None:
        return "no recorded extractor"
    identity = extractor_identity(fields)
    if identity[0] == "resnet50":
        return "resnet50 with seeded random weights" if identity[1] == "random" else f"resnet50 with {identity[2]}"
    return f"{identity[0]} (pixels_grid {identity[1]})"


def same_extractor(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded extractors give the same features; True when either is unknown."""
    return a is None or b is None or extractor_identity(a) == extractor_identity(b)


def corpus_extractor(prefix) -> dict | None:
    """The extractor a corpus's image features were made with, from ``<prefix>_meta.json``
    (through ``merged_from`` for a merged corpus); None when the corpus has no images or no
    metadata. A merge of corpora made with different extractors is a DatasetError."""
    from m6_engine.data.preprocess import meta_path

    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable corpus metadata ({error})") from None
    if "merged_from" not in meta:
        extractor = meta.get("extractor")
        return extractor if isinstance(extractor, dict) else None
    return common_extractor(meta["merged_from"], f"{path}: the corpus merges")


def common_extractor(prefixes, what: str = "the blend mixes") -> dict | None:
    """The one extractor the corpora ``prefixes`` were made with (those without images or metadata
    aside), None when none records one; corpora made with different ones are a DatasetError
    (``what`` starts its message), since a model reads one kind of image feature."""
    found = {str(source): corpus_extractor(source) for source in prefixes}
    known = {source: e for source, e in found.items() if e is not None}
    identities = {extractor_identity(e) for e in known.values()}
    if len(identities) > 1:
        made = ", ".join(f"{source}: {describe_extractor(e)}" for source, e in known.items())
        raise DatasetError(f"{what} image features of different extractors ({made}); a model can read one kind")
    return next(iter(known.values()), None)


def check_extractor(chosen: dict | None, recorded: dict | None, *, chosen_what: str, recorded_what: str) -> None:
    """ConfigError when two known extractors give different features, naming both."""
    if not same_extractor(chosen, recorded):
        raise ConfigError(f"{chosen_what} uses {describe_extractor(chosen)}, but {recorded_what} was trained "
                          f"on features of {describe_extractor(recorded)}")


def check_vocab(vocab_hash: str, recorded: ModelInputs | None, *, chosen_what: str, recorded_what: str) -> None:
    """ConfigError when a vocabulary is not the one a model was trained with."""
    if recorded is not None and vocab_hash != recorded.vocab_hash:
        raise ConfigError(f"{chosen_what} is not the vocabulary {recorded_what} was trained with "
                          f"(fingerprint {vocab_hash[:12]}..., the checkpoint's {recorded.vocab_hash[:12]}...)")


def read_checkpoint_vocab(folder: Path) -> Path | None:
    """The vocabulary stored in a checkpoint folder, if it has one."""
    path = Path(folder) / VOCAB_FILE
    return path if path.is_file() else None
