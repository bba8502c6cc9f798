"""One corpus's stream of samples: its documents sorted into sources, the task of each of its
samples, the shuffled order it reads each source in, and how a sample is packed.

:class:`m6_engine.data.dataset.PretrainDataset` runs one stream per corpus and blends them; the
module docstring there gives the sample stream as a whole. Here, sample ``l`` of a corpus (its
``l``-th, counting only the samples the blend gave this corpus):

1. its task is ``TaskMixer(task_weights, seed).task_of(l)``;
2. its document is the next one of the task's source: the k-th draw from a source of N documents
   is ``docs[perm_e(k mod N)]`` with ``e = k // N`` (the source's epoch) and ``perm_e`` the keyed
   permutation of ``(seed, source, e)`` (:class:`m6_engine.data.permutation.KeyedPermutation`,
   O(1) per draw, nothing held per document): every document once per epoch, reshuffled each epoch;
3. the task's builder packs it with random choices drawn from ``TaskMixer.rng_of(l)``.

The sources come from the corpus's sample index when it has a current one
(:mod:`m6_engine.data.sample_index`, built offline): opening is then O(1) in the corpus size and
the document lists are shared, mapped pages. Without one, the stream scans every image document
itself, as the reference :func:`~m6_engine.data.sample_index.scan_sources` does, and says so once.
"""

import warnings
from typing import Dict, Mapping, Tuple

import numpy as np

from m6_engine.data import indexed, tasks
from m6_engine.data.doc_tokens import tokenizer_fingerprint
from m6_engine.data.permutation import KeyedPermutation
from m6_engine.data.preprocess import DEFAULT_ANSWER_MARKER, image_prefix, text_prefix
from m6_engine.data.sample_index import SOURCES, find_marker, open_sample_index, sample_index_path, scan_sources
from m6_engine.data.tasks import SampleLayout, TaskMixer

SOURCE_OF_TASK = {"text_denoising": "text", "language_modelling": "text",
                  "image_to_text": "captions", "multimodal_to_text": "pairs",
                  tasks.IMAGE_TEXT_MATCHING: "captions"}
_PERMUTATION_TAG = 0x7065726D  # "perm": the permutation keys never equal the task or rng_of streams
_SUBSTITUTE_DRAWS = 16  # uniform draws for an image-text matching negative before a scan


class DatasetError(ValueError):
    """The corpus does not fit the dataset's configuration, tokenizer or layout, or a state does not fit it."""


class Source:
    """Documents of one source and the permutation of its current epoch."""

    def __init__(self, name: str, docs: np.ndarray, seed: int):
        self.name, self.docs, self.seed = name, docs, seed
        self._perm: Tuple[int, KeyedPermutation | None] = (-1, None)

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, draw: int) -> int:
        """Document number of the ``draw``-th draw (0-based, counting over all epochs)."""
        epoch, k = divmod(draw, len(self.docs))
        if self._perm[0] != epoch:
            key = [self.seed, _PERMUTATION_TAG, SOURCES.index(self.name), epoch]
            self._perm = (epoch, KeyedPermutation(len(self.docs), key))
        return int(self.docs[self._perm[1][k]])


def _window(ids: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random run of ``length`` tokens of ``ids`` (all of them when shorter)."""
    if len(ids) <= length:
        return ids
    start = int(rng.integers(0, len(ids) - length + 1))
    return ids[start:start + length]


class CorpusStream:
    """The samples of one corpus, in order (module docstring); ``position`` samples taken so far."""

    def __init__(self, corpus: str, seed: int, task_weights: Mapping[str, float], answer_marker: str,
                 layout: SampleLayout, tokenizer):
        self.corpus, self.seed, self.layout = corpus, seed, layout
        self.answer_marker = np.asarray(tokenizer.encode(answer_marker), dtype=np.int64)
        fingerprint = tokenizer_fingerprint(tokenizer)
        # Header checks only (O(1)); the whole index is checked below when no sample index vouches for it.
        self.texts = indexed.open_tokens(text_prefix(corpus), tokenizer.vocab_size, fingerprint, check_offsets=False)
        self.images = indexed.open_patches(image_prefix(corpus), layout.num_patches, layout.patch_feature_dim,
                                           check_offsets=False)
        index = open_sample_index(corpus)
        stale = "it has none" if index is None else index.mismatch(self.texts, self.images, self.answer_marker)
        if stale is None:
            docs, max_image, patch_rows = index.sources, index.max_image_id, index.patch_rows
        else:
            marker = "" if answer_marker == DEFAULT_ANSWER_MARKER else f" --answer-marker '{answer_marker}'"
            warnings.warn(f"corpus {corpus!r}: not using a sample index ({sample_index_path(corpus)}: {stale}), so "
                          f"every rank scans its documents at start-up (O(corpus size)); build one once with "
                          f"`python -m m6_engine.data.preprocess --index {corpus}{marker}`", stacklevel=3)
            self.texts = indexed.open_tokens(text_prefix(corpus), tokenizer.vocab_size, fingerprint)
            self.images = indexed.open_patches(image_prefix(corpus), layout.num_patches, layout.patch_feature_dim)
            docs = scan_sources(self.texts, self.answer_marker)
            image_ids = np.asarray(self.texts.image_ids)
            max_image = int(image_ids.max()) if len(image_ids) else -1
            patch_rows = layout.num_patches if len(self.images) else 0
        if max_image >= len(self.images):
            raise DatasetError(f"{indexed.index_path(text_prefix(corpus))} pairs a document with image row "
                               f"{max_image}, but {image_prefix(corpus)} has {len(self.images)}")
        if patch_rows not in (0, layout.num_patches):
            raise indexed.IndexFormatError(f"{indexed.index_path(image_prefix(corpus))} has images without "
                                           f"exactly {layout.num_patches} patches")
        self.sources = {name: Source(name, docs[name], seed) for name in SOURCES}
        self.mixer = TaskMixer(dict(task_weights), seed)
        for task in self.mixer.tasks:
            if not len(self.sources[SOURCE_OF_TASK[task]]):
                kind = {"text": "text-only", "captions": "caption (image, no answer marker)",
                        "pairs": "image-text"}[SOURCE_OF_TASK[task]]
                raise DatasetError(f"task {task} has weight {task_weights[task]} but corpus "
                                   f"{corpus!r} has no {kind} documents: give it weight 0")
        self.position = 0
        self.draws = {name: 0 for name in SOURCES}

    # ---- state ------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {"documents": {name: len(s) for name, s in self.sources.items()}}

    def state_dict(self) -> dict:
        return {"position": self.position, "draws": dict(self.draws), **self.fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        theirs = {k: state.get(k) for k in self.fingerprint()}
        if theirs != self.fingerprint():
            raise DatasetError(f"data state of corpus {self.corpus!r} saved with {theirs} does not fit it "
                               f"({self.fingerprint()}): another corpus")
        draws = state.get("draws", {})
        if set(draws) != set(SOURCES) or int(state.get("position", -1)) < 0:
            raise DatasetError(f"malformed data state {dict(state)} for corpus {self.corpus!r}")
        self.position = int(state["position"])
        self.draws = {name: int(draws[name]) for name in SOURCES}

    def epochs(self) -> Dict[str, float]:
        """Passes made over each source so far (fractional)."""
        return {name: self.draws[name] / len(s) for name, s in self.sources.items() if len(s)}

    # ---- samples ----------------------------------------------------------------------------------

    def sample(self, local: int, task: str, doc: int) -> tasks.PackedSample:
        """This corpus's sample ``local`` of ``task`` made from document ``doc``."""
        layout, rng = self.layout, self.mixer.rng_of(local)
        ids = self.texts[doc].astype(np.int64)  # (n,)
        half = layout.max_text_positions // 2 - 2
        if task == "text_denoising":
            return tasks.text_denoising(layout, _window(ids, half, rng), rng)
        if task == "language_modelling":
            return tasks.language_modelling(layout, _window(ids, layout.max_text_positions - 2, rng))
        patches = self.images[int(self.texts.image_ids[doc])]  # (16, 2048) fp16, a view of the file
        if task == "image_to_text":
            return tasks.image_to_text(layout, patches, ids)
        if task == tasks.IMAGE_TEXT_MATCHING:
            if rng.random() < 0.5:
                return tasks.image_text_matching(layout, patches, ids, 1)
            other = self._substitute(doc, ids, rng)
            return tasks.image_text_matching(layout, patches, self.texts[other].astype(np.int64), 0)
        at = find_marker(ids, self.answer_marker)
        if at >= 0 and at + len(self.answer_marker) < len(ids):
            split = at + len(self.answer_marker)
            return tasks.multimodal_to_text(layout, patches, ids[:split], ids[split:])
        ids = ids[:half]
        return tasks.multimodal_to_text(layout, patches, tasks.mask_one_span(ids, layout.mask_id, rng), ids)

    def _substitute(self, doc: int, ids: np.ndarray, rng: np.random.Generator) -> int:
        """A caption document whose image and text both differ from ``doc``'s: uniform draws
        (a few), then the first such document after a random start (deterministic either way)."""
        docs = self.sources["captions"].docs
        image = self.texts.image_ids[doc]

        def differs(other: int) -> bool:
            return (self.texts.image_ids[other] != image
                    and not np.array_equal(self.texts[other], ids))

        for _ in range(_SUBSTITUTE_DRAWS):
            other = int(docs[int(rng.integers(len(docs)))])
            if differs(other):
                return other
        start = int(rng.integers(len(docs)))
        for k in range(len(docs)):
            other = int(docs[(start + k) % len(docs)])
            if differs(other):
                return other
        raise DatasetError(f"image_text_matching needs a caption of another image with another text "
                           f"to substitute for document {doc}, and corpus {self.corpus!r} has none")
