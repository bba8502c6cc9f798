"""Image -> patch features: grid order, the size filter, unreadable images, both extractors, the feature index."""

import numpy as np
import pytest
import torch
from PIL import Image

from m6_engine.data import indexed, vision
from m6_engine.data.vision import ExtractorConfig, ImageRejected, RandomWeightsWarning


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid_image(size=224):
    """Each 56 x 56 cell filled with a colour that encodes its (row, col)."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    cell = size // 4
    for r in range(4):
        for c in range(4):
            arr[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = (r * 60, c * 60, 200)
    return Image.fromarray(arr)


def test_patches_are_the_grid_in_row_major_order():
    patches = vision.image_to_patches(_grid_image())
    assert patches.shape == (16, 3, 56, 56) and patches.dtype == torch.float32
    for k in range(16):
        r, c = divmod(k, 4)
        expected = torch.tensor([r * 60, c * 60, 200]).float() / 255
        assert torch.allclose(patches[k].mean(dim=(1, 2)), expected, atol=1e-6), k


def test_any_size_is_resized_to_224():
    img = _grid_image(448).resize((300, 120))
    assert vision.image_to_patches(img).shape == (16, 3, 56, 56)


def test_size_filter(tmp_path):
    Image.new("RGB", (70, 71), "red").save(tmp_path / "small.png")  # 4970 pixels
    Image.new("RGB", (71, 71), "red").save(tmp_path / "ok.png")  # 5041 pixels
    with pytest.raises(ImageRejected) as e:
        vision.load_image(tmp_path / "small.png")
    assert e.value.reason == "too_small" and "4970 pixels < 5000" in str(e.value)
    assert vision.load_image(tmp_path / "ok.png").size == (71, 71)
    assert vision.load_image(tmp_path / "small.png", min_pixels=100).mode == "RGB"


def test_unreadable_images(tmp_path):
    Image.new("RGB", (200, 200), "blue").save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    for name in ("truncated.jpg", "garbage.png", "missing.png"):
        with pytest.raises(ImageRejected) as e:
            vision.load_image(tmp_path / name)
        assert e.value.reason == "unreadable" and name in str(e.value)


def test_pixels_extractor_pools_and_flattens():
    ext = vision.build_extractor(ExtractorConfig("pixels"))
    x = torch.rand(16, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    f = ext(x)
    assert f.shape == (16, 2048) and f.dtype == torch.float32
    # value (c, i, j) of patch n is the mean of its 4 x 4 block (rows 4i.., columns 4j..) minus the
    # image's background: the median, per channel, of all 16 x 14 x 14 block means
    pooled = torch.nn.functional.avg_pool2d(x.double(), 4)  # (16, 3, 14, 14)
    background = pooled.permute(1, 0, 2, 3).reshape(3, -1).quantile(0.5, dim=1, interpolation="midpoint")
    blocks = (pooled - background.view(1, 3, 1, 1)).flatten(1)  # (16, 3 * 14 * 14)
    torch.testing.assert_close(f[:, :588].double(), blocks, rtol=0, atol=1e-6)
    assert (f[:, 588:] == 0).all()
    patches = vision.image_to_patches(_grid_image())
    g = vision.build_extractor(ExtractorConfig("pixels", pixels_grid=1))(patches)
    expected = torch.tensor([[r * 60 / 255, c * 60 / 255, 200 / 255] for r in range(4) for c in range(4)])
    expected -= expected.quantile(0.5, dim=0, interpolation="midpoint")  # the per-channel median
    torch.testing.assert_close(g[:, :3], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="whole images"):
        ext(x[:15])
    for bad in (3, 28):  # 3 does not divide 56; 3 * 28^2 > 2048
        with pytest.raises(ValueError, match="pixels_grid"):
            vision.build_extractor(ExtractorConfig("pixels", pixels_grid=bad))


def _edge_histograms_loop(patches: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Plain reference of vision.edge_histograms: one pixel at a time."""
    n, bins, cell = patches.shape[0], vision.EDGE_BINS, vision.EDGE_CELL
    out = np.zeros((n, bins, 56 // cell, 56 // cell))
    for k in range(n):
        fg = np.sqrt(((patches[k] - background[k][:, None, None]) ** 2).sum(axis=0))
        for i in range(56):
            for j in range(56):
                gx = fg[i, j + 1] - fg[i, j - 1] if 0 < j < 55 else 0.0
                gy = fg[i + 1, j] - fg[i - 1, j] if 0 < i < 55 else 0.0
                angle = np.arctan2(gy, gx) % np.pi
                b = int(np.floor(angle / np.pi * bins + 0.5)) % bins
                out[k, b, i // cell, j // cell] += np.hypot(gx, gy)
    return out.reshape(n, -1) * vision.EDGE_SCALE / cell ** 2


def test_edge_histograms_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    patches = rng.random((2, 3, 56, 56))
    background = rng.random((2, 3))
    np.testing.assert_allclose(vision.edge_histograms(patches, background),
                               _edge_histograms_loop(patches, background), rtol=1e-5, atol=1e-6)


def _one_shape(kind: str) -> Image.Image:
    """A 224 x 224 image with one red square or diamond centred in patch (1, 1)."""
    from PIL import ImageDraw
    img = Image.new("RGB", (224, 224), (240, 240, 240))
    cx, cy, r = 84, 84, 20
    pen = ImageDraw.Draw(img)
    if kind == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=(220, 40, 40))
    else:
        pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=(220, 40, 40))
    return img


def test_pixels_edges_extractor():
    x = torch.rand(32, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    f = vision.build_extractor(ExtractorConfig("pixels_edges"))(x)
    assert f.shape == (32, 2048) and f.dtype == torch.float32
    torch.testing.assert_close(f[:, :588], vision.build_extractor(ExtractorConfig("pixels"))(x)[:, :588])
    assert (f[:, 588 + vision.EDGE_FEATURES:] == 0).all() and (f[:, 588:588 + vision.EDGE_FEATURES] > 0).any()
    # What the features are for: a square's outline votes into the horizontal / vertical gradient
    # bins (0: 0 degrees, 4: 90), a diamond's into the diagonal ones (2: 45, 6: 135).
    ext = vision.build_extractor(ExtractorConfig("pixels_edges"))
    votes = {}
    for kind in ("square", "diamond"):
        edges = ext(vision.image_to_patches(_one_shape(kind)))[:, 588:588 + vision.EDGE_FEATURES]
        votes[kind] = edges.reshape(16, vision.EDGE_BINS, -1).sum(dim=(0, 2))
    assert votes["square"][[0, 4]].sum() > 0.8 * votes["square"].sum()
    assert votes["diamond"][[2, 6]].sum() > 0.8 * votes["diamond"].sum()
    with pytest.raises(ValueError, match="edge values"):
        vision.build_extractor(ExtractorConfig("pixels_edges", pixels_grid=28))  # 2352 + 392 > 2048


def test_extractor_registry_errors():
    assert set(vision.EXTRACTORS) == {"resnet50", "pixels", "pixels_edges"}
    with pytest.raises(ValueError, match="unknown patch extractor 'vgg'"):
        vision.build_extractor(ExtractorConfig("vgg"))
    with pytest.raises(ValueError, match="resnet50 only"):
        vision.build_extractor(ExtractorConfig("pixels", random_weights=True))
    with pytest.raises(ValueError, match="exactly one of"):
        vision.build_extractor(ExtractorConfig("resnet50"))


@pytest.mark.timeout(120)
def test_resnet50_random_and_from_file(tmp_path):
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        ext = vision.build_extractor(ExtractorConfig("resnet50", random_weights=True, seed=3))
    x = vision.image_to_patches(_grid_image())[:4]
    f = ext(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all()
    path = tmp_path / "resnet50.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ext.model.state_dict().items()}}, path)
    loaded = vision.build_extractor(ExtractorConfig("resnet50", weights=str(path)))
    assert torch.allclose(loaded(x), f)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a torchvision resnet50 state dict"):
        vision.build_extractor(ExtractorConfig("resnet50", weights=str(tmp_path / "bad.pt")))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        vision.build_extractor(ExtractorConfig("resnet50", weights=str(tmp_path / "nope.pt")))


@pytest.mark.timeout(120)
def test_write_patch_features_resnet(tmp_path):
    """The feature index with a random ResNet-50: rows, counts, and values equal to a direct call."""
    paths = []
    for k, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (120 + 10 * k, 90), colour).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "tiny.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [paths[0], tmp_path / "tiny.png", paths[1], tmp_path / "broken.png", paths[2]]
    with pytest.warns(RandomWeightsWarning):
        ext = vision.build_extractor(ExtractorConfig("resnet50", random_weights=True))
    rows, stats = vision.write_patch_features(paths, tmp_path / "feat", ext, batch_size=2)
    assert rows == [0, -1, 1, -1, 2]
    assert (stats.seen, stats.written, stats.too_small, stats.unreadable) == (5, 3, 1, 1)
    ds = indexed.open_patches(tmp_path / "feat", num_patches=16, feature_dim=2048)
    assert len(ds) == 3 and ds[0].dtype == np.float16
    direct = ext(vision.image_to_patches(vision.load_image(paths[4]))).half().numpy()
    np.testing.assert_allclose(ds[2].astype(np.float32), direct.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_write_patch_features_in_worker_processes(tmp_path):
    """Images decoded and cut by 2 workers: the same rows, counts and bytes as in one process."""
    paths = []
    for k in range(7):
        path = tmp_path / f"{k}.png"
        size = (30, 30) if k == 3 else (80 + 20 * k, 100)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    paths.append(tmp_path / "missing.png")
    ext = vision.build_extractor(ExtractorConfig("pixels"))
    results = [vision.write_patch_features(paths, tmp_path / f"w{w}", ext, batch_size=3, workers=w) for w in (1, 2)]
    assert results[0] == results[1]
    rows, stats = results[0]
    assert rows == [0, 1, 2, -1, 3, 4, 5, -1] and (stats.too_small, stats.unreadable, stats.written) == (1, 1, 6)
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    ds = indexed.open_patches(tmp_path / "w2", 16, 2048)
    expected = ext(vision.image_to_patches(vision.load_image(paths[5]))).numpy().astype(np.float16)
    assert np.array_equal(ds[4], expected)
