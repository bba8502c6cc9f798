"""The training dataset: micro-batches of packed M6 samples read from a preprocessed corpus, for
pretraining (the four tasks mixed) and finetuning (one task alone, ``task_weights``).

A corpus is what ``python -m m6_engine.data.preprocess`` writes: ``<corpus>_text`` (one token
sequence per document, each with the row of its image or -1) and ``<corpus>_image`` (16 × 2048
fp16 patch features per image). Its documents form three *sources*:

* ``text``: documents without an image, for text denoising and language modelling;
* ``captions``: documents with an image and without ``answer_marker`` (captions), for
  image-to-text and image-text matching: with nothing but the image as prefix, the target must
  be one kind of text, or a captioning model could not know whether to describe the image or to
  ask about it;
* ``pairs``: every document with an image (captions and question-answer texts), for
  multimodality-to-text, where the prefix text says what is wanted.

A finetuning corpus is preprocessed the same way (docs/finetuning.md): captioning and image-text
matching read ``{"image": ..., "content": caption}`` lines, visual question answering
``{"image": ..., "content": "问：question答：answer"}`` lines.

Sorting image documents into captions and question-answer texts reads each one once when the
dataset opens (a search for the marker's first token, vectorised).

The sample stream is one global sequence, the same on every rank. Sample ``g`` (0, 1, 2, ...):

1. its task is ``TaskMixer(task_weights, seed).task_of(g)`` (:mod:`m6_engine.data.tasks`);
2. its document is the next one of the task's source: the k-th draw from a source of N documents
   is ``perm_e[k mod N]`` with ``e = k // N`` (the source's epoch) and ``perm_e`` a permutation
   drawn from ``(seed, source, e)``: every document once per epoch, reshuffled each epoch;
3. the task's builder packs it, random choices drawn from ``TaskMixer.rng_of(g)``:

   * ``text_denoising``: a random window of at most ``max_text_positions / 2 - 2`` tokens, one
     span of ~15 % replaced by a single [MASK] as the prefix, the window decoded;
   * ``language_modelling``: a random window of at most ``max_text_positions - 2`` tokens, decoded
     from an empty prefix (windows let long documents be used beyond their first tokens);
   * ``image_to_text``: the 16 patches, the caption decoded;
   * ``multimodal_to_text``: a question-answer text (one holding ``answer_marker``, "答：")
     gives patches + the question up to and including the marker as the prefix and decodes
     the answer; any other text is masked as in text denoising and decoded whole;
   * ``image_text_matching`` (finetuning, appendix A.2): a caption document's patches with, at
     probability 1/2, its own text (label 1), else the text of another caption document drawn
     uniformly from the source (label 0: random substitution), redrawn while that document has
     the same image or the same text, so a negative is never a true pair.

Parallel layout: global micro-batch ``m`` is samples ``[m·dp·B, (m+1)·dp·B)`` (B the micro-batch
size) and data-parallel rank ``r`` takes ``[m·dp·B + r·B, m·dp·B + (r+1)·B)``. The stream depends on
neither the rank nor the tensor/pipeline layout: all tensor-parallel ranks (and pipeline stages)
of one data-parallel replica get identical micro-batches, and the ranks of one step together read
exactly the samples one process would.

State: after ``m`` micro-batches the position is ``g = m·dp·B`` and each source's draw count is
the number of samples before ``g`` that used it. :meth:`PretrainDataset.state_dict` returns both;
:meth:`PretrainDataset.load_state_dict` resumes there (with any dp size or micro-batch size).

When a source runs out (``exhausted``): ``"wrap"`` starts its next epoch; ``"stop"`` ends the
iteration before the first *step* (``num_microbatches`` micro-batches) that would need a
document beyond its first epoch, the same step on every rank, so no rank is left waiting.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

from m6_engine.data import indexed, tasks
from m6_engine.data.doc_tokens import tokenizer_fingerprint
from m6_engine.data.preprocess import image_prefix, text_prefix
from m6_engine.data.tasks import SampleLayout, TaskMixer

SOURCES = ("text", "captions", "pairs")
"""Document sources: text-only documents, image captions, all image-text documents."""
SOURCE_OF_TASK = {"text_denoising": "text", "language_modelling": "text",
                  "image_to_text": "captions", "multimodal_to_text": "pairs",
                  tasks.IMAGE_TEXT_MATCHING: "captions"}
EXHAUSTED_MODES = ("wrap", "stop")
_PERMUTATION_TAG = 0x7065726D  # "perm"
_SUBSTITUTE_DRAWS = 16  # uniform draws for an image-text matching negative before a scan


class DatasetError(ValueError):
    """The corpus does not fit the dataset's configuration, tokenizer or layout, or a state does not fit it."""


@dataclass(frozen=True)
class DatasetConfig:
    """Which corpus, how tasks mix, how samples are batched, and what happens at the end of the data."""

    corpus: str
    """Corpus prefix: ``<corpus>_text`` and ``<corpus>_image`` written by preprocess."""
    task_weights: Mapping[str, float] = field(default_factory=lambda: {t: 1.0 for t in tasks.TASKS})
    """Relative frequency of each task (``tasks.ALL_TASKS``); a task left out or at 0 never occurs,
    so one task alone is a finetuning mix."""
    seed: int = 0
    """Seed of the task sequence, the document permutations and every sample's random choices."""
    micro_batch_size: int = 1
    """Samples per micro-batch on each data-parallel rank."""
    num_microbatches: int = 1
    """Micro-batches per optimizer step (``"stop"`` only ends on a step boundary)."""
    exhausted: str = "wrap"
    """``"wrap"``: a source that runs out starts a new, reshuffled epoch; ``"stop"``: end the iteration."""
    answer_marker: str = "答："
    """Text that ends the question of a question-answer document (multimodal_to_text); "" disables."""

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.num_microbatches < 1:
            raise DatasetError(f"DatasetConfig.micro_batch_size and num_microbatches must be >= 1, got "
                               f"{self.micro_batch_size} and {self.num_microbatches}")
        if self.exhausted not in EXHAUSTED_MODES:
            raise DatasetError(f"DatasetConfig.exhausted must be one of {EXHAUSTED_MODES}, got {self.exhausted!r}")


class _Source:
    """Documents of one source and their per-epoch permutation (only the current epoch's is kept)."""

    def __init__(self, name: str, docs: np.ndarray, seed: int):
        self.name, self.docs, self.seed = name, docs, seed
        self._perm: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, draw: int) -> int:
        """Document number of the ``draw``-th draw (0-based, counting over all epochs)."""
        epoch, k = divmod(draw, len(self.docs))
        if self._perm[0] != epoch:
            # A 4-word seed with its own tag: TaskMixer's streams are [seed, g] and [seed, g, 1].
            rng = np.random.default_rng([self.seed, _PERMUTATION_TAG, SOURCES.index(self.name), epoch])
            self._perm = (epoch, rng.permutation(len(self.docs)))
        return int(self.docs[self._perm[1][k]])


def _find(ids: np.ndarray, marker: np.ndarray) -> int:
    """Index of the first occurrence of ``marker`` in ``ids``, or -1."""
    m = len(marker)
    if m == 0 or len(ids) < m:
        return -1
    for i in np.flatnonzero(ids[:len(ids) - m + 1] == marker[0]).tolist():
        if np.array_equal(ids[i:i + m], marker):
            return i
    return -1


def _window(ids: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random run of ``length`` tokens of ``ids`` (all of them when shorter)."""
    if len(ids) <= length:
        return ids
    start = int(rng.integers(0, len(ids) - length + 1))
    return ids[start:start + length]


class PretrainDataset:
    """Iterator of collated micro-batches for one data-parallel rank (module docstring).

    Each micro-batch is :func:`m6_engine.data.tasks.collate`'s dict plus ``sample_index`` (B,)
    int64, the global index of each sample.
    """

    def __init__(self, config: DatasetConfig, layout: SampleLayout, tokenizer, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise DatasetError(f"dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
        specials = (layout.pad_id, layout.cls_id, layout.sep_id, layout.mask_id)
        if specials != (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id):
            raise DatasetError(f"the sample layout's special ids {specials} are not the tokenizer's")
        self.config, self.layout = config, layout
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.texts = indexed.open_tokens(text_prefix(config.corpus), tokenizer.vocab_size,
                                         tokenizer_fingerprint(tokenizer))
        self.images = indexed.open_patches(image_prefix(config.corpus), layout.num_patches, layout.patch_feature_dim)
        image_ids = np.asarray(self.texts.image_ids)
        if len(image_ids) and image_ids.max() >= len(self.images):
            raise DatasetError(f"{indexed.index_path(text_prefix(config.corpus))} pairs a document with image row "
                               f"{int(image_ids.max())}, but {image_prefix(config.corpus)} has {len(self.images)}")
        self.sources = {"text": _Source("text", np.flatnonzero(image_ids < 0), config.seed),
                        "captions": _Source("captions", self._captions(image_ids, tokenizer), config.seed),
                        "pairs": _Source("pairs", np.flatnonzero(image_ids >= 0), config.seed)}
        self.mixer = TaskMixer(dict(config.task_weights), config.seed)
        for task in self.mixer.tasks:
            if not len(self.sources[SOURCE_OF_TASK[task]]):
                kind = {"text": "text-only", "captions": "caption (image, no answer marker)",
                        "pairs": "image-text"}[SOURCE_OF_TASK[task]]
                raise DatasetError(f"task {task} has weight {config.task_weights[task]} but corpus "
                                   f"{config.corpus!r} has no {kind} documents: give it weight 0")
        self.answer_marker = np.asarray(tokenizer.encode(config.answer_marker), dtype=np.int64)
        self.position = 0
        self.draws = {name: 0 for name in SOURCES}

    def _captions(self, image_ids: np.ndarray, tokenizer) -> np.ndarray:
        """Image documents without the answer marker (all of them when the marker is empty)."""
        paired = np.flatnonzero(image_ids >= 0)
        marker = np.asarray(tokenizer.encode(self.config.answer_marker), dtype=np.int64)
        if not len(marker):
            return paired
        return np.asarray([d for d in paired.tolist() if _find(self.texts[d], marker) < 0], dtype=np.int64)

    @classmethod
    def for_rank(cls, config: DatasetConfig, layout: SampleLayout, tokenizer, state) -> "PretrainDataset":
        """The dataset of this process in a :class:`m6_engine.parallel.state.ParallelState`: only its
        dp coordinate matters, so tp peers and pipeline stages of one replica read the same batches."""
        return cls(config, layout, tokenizer, state.dp_rank, state.dp_size)

    # ---- state ------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {"seed": self.config.seed, "documents": {name: len(s) for name, s in self.sources.items()}}

    def state_dict(self) -> dict:
        """Position in the global sample stream and the draws from each source so far (plain ints)."""
        return {"position": self.position, "draws": dict(self.draws), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuses a state saved with another seed or corpus."""
        mine = self._fingerprint()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise DatasetError(f"data state saved with {theirs} does not fit this dataset ({mine}): "
                               f"another seed or corpus")
        draws = state.get("draws", {})
        if set(draws) != set(SOURCES) or int(state["position"]) < 0:
            raise DatasetError(f"malformed data state {state}")
        self.position = int(state["position"])
        self.draws = {name: int(draws[name]) for name in SOURCES}

    def epochs(self) -> Dict[str, float]:
        """Passes made over each source so far (fractional)."""
        return {name: self.draws[name] / len(s) for name, s in self.sources.items() if len(s)}

    # ---- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        c = self.config
        global_batch = self.dp_size * c.micro_batch_size
        if c.exhausted == "stop" and (self.position // global_batch) % c.num_microbatches == 0:
            if self._step_overruns(global_batch * c.num_microbatches):
                raise StopIteration
        mine = range(self.dp_rank * c.micro_batch_size, (self.dp_rank + 1) * c.micro_batch_size)
        samples, indices = [], []
        for j in range(global_batch):
            g = self.position + j
            task = self.mixer.task_of(g)
            source = SOURCE_OF_TASK[task]
            draw = self.draws[source]
            self.draws[source] += 1
            if j in mine:
                samples.append(self.sample(g, task, self.sources[source].document(draw)))
                indices.append(g)
        self.position += global_batch
        return dataclasses.replace(tasks.collate(samples, self.layout),
                                   sample_index=torch.tensor(indices, dtype=torch.int64))

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
                           f"to substitute for document {doc}, and corpus {self.config.corpus!r} has none")

    def _step_overruns(self, num_samples: int) -> bool:
        """Whether the next ``num_samples`` samples would draw some source past its first epoch."""
        need = dict(self.draws)
        for g in range(self.position, self.position + num_samples):
            need[SOURCE_OF_TASK[self.mixer.task_of(g)]] += 1
        return any(need[name] > len(s) for name, s in self.sources.items())

    def sample(self, g: int, task: str, doc: int) -> tasks.PackedSample:
        """Global sample ``g`` of ``task`` made from document ``doc`` (iteration picks task and doc)."""
        layout, rng = self.layout, self.mixer.rng_of(g)
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
        at = _find(ids, self.answer_marker)
        if at >= 0 and at + len(self.answer_marker) < len(ids):
            split = at + len(self.answer_marker)
            return tasks.multimodal_to_text(layout, patches, ids[:split], ids[split:])
        ids = ids[:half]
        return tasks.multimodal_to_text(layout, patches, tasks.mask_one_span(ids, layout.mask_id, rng), ids)
