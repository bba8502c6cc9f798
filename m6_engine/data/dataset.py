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

Sorting image documents into captions and question-answer texts is done once, offline, by the
corpus's sample index (:mod:`m6_engine.data.sample_index`; ``python -m m6_engine.data.preprocess
--index PREFIX``, which preprocess also runs itself): every rank maps it and opens in O(1).

Several corpora can be blended (``corpora``: ``[{path, weight}]``; M6-Corpus mixes encyclopedia,
QA, forum, crawl and image-text sources). The sample stream is one global sequence, the same on
every rank: global sample ``g`` (0, 1, 2, ...) comes from the corpus that
:func:`m6_engine.data.blend.blend_choice` names (Megatron's blended-dataset rule: the corpus
furthest behind its share of the weights), as that corpus's next sample. Each corpus is a
:class:`~m6_engine.data.corpus_stream.CorpusStream` with its own task sequence, document order and
random choices (the first corpus seeded by ``seed``, corpus ``k > 0`` by a seed derived from
``(seed, k)``); one corpus alone is a blend of one, whose sample ``l`` is global sample ``l``.
Within a corpus, its sample ``l``:

1. has task ``TaskMixer(task_weights, seed).task_of(l)`` (:mod:`m6_engine.data.tasks`);
2. reads the next document of the task's source, every document once per epoch in an order
   reshuffled every epoch (a keyed permutation, O(1) per draw: :mod:`m6_engine.data.corpus_stream`);
3. is packed by the task's builder, random choices drawn from ``TaskMixer.rng_of(l)``:

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

State: after ``m`` micro-batches the position is ``g = m·dp·B``; each corpus's position is the
number of samples before ``g`` it gave (the blend's counts) and each of its sources' draw count the
number of those that used it. :meth:`PretrainDataset.state_dict` returns them all (the per-corpus
sample counts are what the trainer logs, :func:`samples_per_corpus`);
:meth:`PretrainDataset.load_state_dict` resumes there (with any dp size or micro-batch size).

When a source runs out (``exhausted``): ``"wrap"`` starts its next epoch; ``"stop"`` ends the
iteration before the first *step* (``num_microbatches`` micro-batches) that would need a
document beyond its first epoch, the same step on every rank, so no rank is left waiting.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NamedTuple, Tuple

import numpy as np
import torch

from m6_engine.data import tasks
from m6_engine.data.blend import blend_choice, normalized_weights
from m6_engine.data.corpus_stream import SOURCE_OF_TASK, CorpusStream, DatasetError
from m6_engine.data.preprocess import DEFAULT_ANSWER_MARKER
from m6_engine.data.sample_index import SOURCES
from m6_engine.data.tasks import SampleLayout

EXHAUSTED_MODES = ("wrap", "stop")
ORDER_VERSION = 2
"""Which sample order a saved state belongs to: 2 = keyed permutations and blending (a state of
the earlier order, per-epoch ``rng.permutation`` of one corpus, would resume at other samples)."""
_CORPUS_SEED_TAG = 0x636F7270  # "corp"

__all__ = ["CorpusWeight", "DatasetConfig", "DatasetError", "PretrainDataset", "SOURCES", "SOURCE_OF_TASK",
           "samples_per_corpus"]


@dataclass(frozen=True)
class CorpusWeight:
    """One corpus of a blend: its prefix, its relative weight and the name it is logged under."""

    path: str
    weight: float = 1.0
    name: str = ""
    """Shown in logs and TensorBoard (``samples/<name>``); empty: the prefix's last component."""


def parse_corpora(value, where: str = "corpora") -> Tuple[CorpusWeight, ...]:
    """A blend given as a list of ``{path, weight[, name]}`` mappings (YAML), CorpusWeight objects,
    or Megatron's ``--data-path`` string ``"W1 PREFIX1 W2 PREFIX2 ..."`` (a lone prefix: weight 1)."""
    if isinstance(value, str):
        words = value.split()
        if len(words) == 1:
            value = [{"path": words[0]}]
        elif len(words) % 2:
            raise DatasetError(f"{where}: {value!r} is not 'WEIGHT PREFIX' pairs")
        else:
            try:
                value = [{"path": p, "weight": float(w)} for w, p in zip(words[::2], words[1::2])]
            except ValueError:
                raise DatasetError(f"{where}: {value!r} is not 'WEIGHT PREFIX' pairs") from None
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{where} must be a list of {{path, weight}} mappings, got {value!r}")
    corpora = []
    for i, item in enumerate(value):
        if isinstance(item, CorpusWeight):
            corpora.append(item)
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("path"), str) or not item["path"]:
            raise DatasetError(f"{where}[{i}] must be a mapping with a 'path' (and 'weight', 'name'), got {item!r}")
        unknown = sorted(set(item) - {"path", "weight", "name"})
        if unknown:
            raise DatasetError(f"{where}[{i}] has unknown keys {unknown}; a corpus has path, weight, name")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise DatasetError(f"{where}[{i}].weight must be a number, got {weight!r}")
        corpora.append(CorpusWeight(item["path"], float(weight), str(item.get("name", ""))))
    try:
        normalized_weights([c.weight for c in corpora], where)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    names = [c.name or Path(c.path).name for c in corpora]
    if len(set(names)) != len(names):
        raise DatasetError(f"{where}: corpus names {names} repeat; give each corpus a distinct 'name'")
    return tuple(dataclasses.replace(c, name=n) for c, n in zip(corpora, names))


@dataclass(frozen=True)
class DatasetConfig:
    """Which corpora, how tasks mix, how samples are batched, and what happens at the end of the data."""

    corpus: str = ""
    """Corpus prefix: ``<corpus>_text`` and ``<corpus>_image`` written by preprocess (or ``corpora``)."""
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
    answer_marker: str = DEFAULT_ANSWER_MARKER
    """Text that ends the question of a question-answer document (multimodal_to_text); "" disables."""
    corpora: Tuple[CorpusWeight, ...] = ()
    """A weighted blend of corpora instead of ``corpus`` (:func:`parse_corpora` forms)."""

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.num_microbatches < 1:
            raise DatasetError(f"DatasetConfig.micro_batch_size and num_microbatches must be >= 1, got "
                               f"{self.micro_batch_size} and {self.num_microbatches}")
        if self.exhausted not in EXHAUSTED_MODES:
            raise DatasetError(f"DatasetConfig.exhausted must be one of {EXHAUSTED_MODES}, got {self.exhausted!r}")
        if bool(self.corpus) == bool(self.corpora):
            raise DatasetError("DatasetConfig: give either corpus (one prefix) or corpora (a weighted blend), "
                               f"not {'both' if self.corpus else 'neither'}")
        if self.corpora:
            object.__setattr__(self, "corpora", parse_corpora(self.corpora, "DatasetConfig.corpora"))

    @property
    def blend(self) -> Tuple[CorpusWeight, ...]:
        """The corpora read: ``corpora``, or ``corpus`` alone with weight 1."""
        return self.corpora or parse_corpora([{"path": self.corpus}])


def corpus_seed(seed: int, k: int) -> int:
    """Seed of corpus ``k`` of a blend: ``seed`` for the first, a derived one for the others."""
    if k == 0:
        return seed
    return int(np.random.SeedSequence([seed, _CORPUS_SEED_TAG, k]).generate_state(1, np.uint64)[0] >> 1)


class _Draw(NamedTuple):
    """What global sample ``g`` is: corpus ``corpus``'s sample ``local`` of ``task``, document draw
    ``draw`` of ``source``."""

    g: int
    corpus: int
    local: int
    task: str
    source: str
    draw: int


def samples_per_corpus(state: Mapping) -> Dict[str, int]:
    """{corpus name: samples it gave} of a :meth:`PretrainDataset.state_dict` (all dp ranks together)."""
    return {c["name"]: int(c["position"]) for c in state["corpora"]}


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
        self.blend = config.blend
        self.weights = normalized_weights([c.weight for c in self.blend])
        self.streams: List[CorpusStream] = [
            CorpusStream(c.path, corpus_seed(config.seed, k), config.task_weights, config.answer_marker,
                         layout, tokenizer) for k, c in enumerate(self.blend)]
        self.position = 0

    @classmethod
    def for_rank(cls, config: DatasetConfig, layout: SampleLayout, tokenizer, state) -> "PretrainDataset":
        """The dataset of this process in a :class:`m6_engine.parallel.state.ParallelState`: only its
        dp coordinate matters, so tp peers and pipeline stages of one replica read the same batches."""
        return cls(config, layout, tokenizer, state.dp_rank, state.dp_size)

    # ---- state ------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {"seed": self.config.seed, "order": ORDER_VERSION, "weights": [c.weight for c in self.blend]}

    def state_dict(self) -> dict:
        """Position in the global sample stream and each corpus's samples and draws so far (plain data)."""
        return {"position": self.position, **self._fingerprint(),
                "corpora": [{"name": c.name, **s.state_dict()} for c, s in zip(self.blend, self.streams)]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuses a state saved with another seed, order, blend or corpus."""
        if state.get("order") != ORDER_VERSION:
            raise DatasetError(f"data state {state} was saved by an earlier m6-engine with another sample order "
                               f"(order {state.get('order', 1)}, this one reads {ORDER_VERSION}): it cannot resume "
                               f"at the same samples; start the data afresh or use that version")
        mine = self._fingerprint()
        theirs = {k: state.get(k) for k in mine}
        corpora = state.get("corpora")
        if theirs != mine or not isinstance(corpora, list) or len(corpora) != len(self.streams):
            raise DatasetError(f"data state saved with {theirs} and {len(corpora or [])} corpora does not fit this "
                               f"dataset ({mine}, {len(self.streams)} corpora): another seed or blend")
        if int(state.get("position", -1)) != sum(int(c.get("position", -1)) for c in corpora):
            raise DatasetError(f"malformed data state {state}: the corpora's positions do not add up to the position")
        for stream, saved in zip(self.streams, corpora):
            stream.load_state_dict(saved)
        self.position = int(state["position"])

    def epochs(self) -> Dict[str, float]:
        """Passes made over each source so far (fractional); with a blend, keyed ``<corpus>/<source>``."""
        if len(self.streams) == 1:
            return self.streams[0].epochs()
        return {f"{c.name}/{k}": v for c, s in zip(self.blend, self.streams) for k, v in s.epochs().items()}

    # ---- iteration --------------------------------------------------------------------------------

    def _plan(self, num_samples: int) -> Tuple[List[_Draw], List[int], List[Dict[str, int]]]:
        """What the next ``num_samples`` global samples are, and the corpus positions and draw counts
        after them; nothing is changed (a plan is committed by ``__next__``)."""
        firsts = [s.position for s in self.streams]
        counts, corpus_of = list(firsts), []
        for g in range(self.position, self.position + num_samples):
            k = blend_choice(self.weights, counts, g) if len(self.streams) > 1 else 0
            corpus_of.append(k)
            counts[k] += 1
        # each corpus's tasks for its run of local indices, in one vectorised draw
        tasks_of = [s.mixer.tasks_of(first, n - first) for s, first, n in zip(self.streams, firsts, counts)]
        draws = [dict(s.draws) for s in self.streams]
        taken, plan = list(firsts), []
        for g, k in enumerate(corpus_of, start=self.position):
            local = taken[k]
            taken[k] += 1
            task = tasks_of[k][local - firsts[k]]
            source = SOURCE_OF_TASK[task]
            plan.append(_Draw(g, k, local, task, source, draws[k][source]))
            draws[k][source] += 1
        return plan, counts, draws

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        c = self.config
        global_batch = self.dp_size * c.micro_batch_size
        if c.exhausted == "stop" and (self.position // global_batch) % c.num_microbatches == 0:
            step, _, _ = self._plan(global_batch * c.num_microbatches)
            if any(d.draw >= len(self.streams[d.corpus].sources[d.source]) for d in step):
                raise StopIteration
        plan, counts, draws = self._plan(global_batch)
        mine = plan[self.dp_rank * c.micro_batch_size:(self.dp_rank + 1) * c.micro_batch_size]
        samples = []
        for d in mine:
            stream = self.streams[d.corpus]
            samples.append(stream.sample(d.local, d.task, stream.sources[d.source].document(d.draw)))
        for stream, position, drawn in zip(self.streams, counts, draws):
            stream.position, stream.draws = position, drawn
        self.position += global_batch
        return dataclasses.replace(tasks.collate(samples, self.layout),
                                   sample_index=torch.tensor([d.g for d in mine], dtype=torch.int64))
