"""WSICoordsDataset reads exactly the source pixels addressed by CLAM coords files."""
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is part of the test install")

from dino.data.datasets.wsi_coords import WSICoordsDataset  # noqa: E402
from dino.data.wsi.patching import PatchingConfig, patch_slide, write_coords_h5  # noqa: E402
from dino.data.wsi.pyramid_tiff import write_pyramidal_tiff  # noqa: E402

SIZE = 1024


def make_slide(seed):
    """Random-textured tissue rectangle on white; the texture makes any misread pixel visible."""
    rng = np.random.default_rng(seed)
    rgb = np.full((SIZE, SIZE, 3), 255, np.uint8)
    rgb[128:896, 256:1024] = rng.integers(60, 230, size=(768, 768, 3), dtype=np.uint8)
    return rgb


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi_ds")
    arrays = {}
    for i, name in enumerate(["slide_b", "slide_a"]):
        arrays[name] = make_slide(i)
        sub = root / "slides" / ("nested" if i else "")
        write_pyramidal_tiff(sub / f"{name}.tif", arrays[name], mpp=0.5, tile=128, n_levels=2)
        result = patch_slide(sub / f"{name}.tif", root / "out", PatchingConfig(patch_size=128, save_thumbnail=False))
        assert result.status == "done"
    return root, arrays


def test_reads_level0_pixels_and_order_is_fixed(data):
    root, arrays = data
    ds = WSICoordsDataset(slides=root / "slides", coords=root / "out" / "coords")
    assert len(ds) == len(WSICoordsDataset(root / "slides", root / "out" / "coords")) > 20
    # Sorted by slide id, then in file order: slide_a first although it was written second.
    assert os.path.basename(ds.slide_paths[0]) == "slide_a.tif"
    first_b = int(np.argmax(ds.slide_index == 1))
    assert first_b > 0 and (ds.slide_index[:first_b] == 0).all()
    for index in [0, first_b - 1, first_b, len(ds) - 1]:
        img, target = ds[index]
        path, x, y = ds.get_location(index)
        src = arrays[os.path.basename(path)[:-4]]
        assert target == 0 and img.mode == "RGB" and img.size == (128, 128)
        np.testing.assert_array_equal(np.asarray(img), src[y:y + 128, x:x + 128])
    again = WSICoordsDataset(root / "slides", root / "out" / "coords")
    np.testing.assert_array_equal(again.coords, ds.coords)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_transforms_resize_and_other_level(data):
    root, arrays = data
    ds = WSICoordsDataset(root / "slides", root / "out" / "coords", transform=lambda im: np.asarray(im),
                          target_transform=lambda t: t + 7, patch_size=64)
    arr, target = ds[0]
    assert target == 7 and arr.shape == (64, 64, 3)
    # Level 1 keeps the level-0 footprint (128 px) and reads 64 px of the half-size level.
    lvl1 = WSICoordsDataset(str(root / "slides"), str(root / "out" / "coords"), level="1", patch_size="64")
    img, _ = lvl1[0]
    path, x, y = lvl1.get_location(0)
    src = arrays[os.path.basename(path)[:-4]]
    half = src[y:y + 128, x:x + 128].astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert img.size == (64, 64) and np.abs(np.asarray(img) - half).max() <= 1.0


def test_transparent_outside_of_slide_reads_white(data, tmp_path):
    root, arrays = data
    coords_dir = tmp_path / "coords"
    # A patch hanging over the right edge: the part outside the scan must come back white.
    write_coords_h5(coords_dir / "slide_a.h5", np.array([[SIZE - 64, 200]]), {"patch_size": 128, "patch_level": 0})
    img, _ = WSICoordsDataset(root / "slides", coords_dir)[0]
    arr = np.asarray(img)
    np.testing.assert_array_equal(arr[:, :64], arrays["slide_a"][200:328, SIZE - 64:])
    assert (arr[:, 64:] == 255).all()


def test_handles_are_per_process_and_not_pickled(data):
    root, _ = data
    ds = WSICoordsDataset(root / "slides", root / "out" / "coords", max_open_slides=1)
    ds[0]
    ds[len(ds) - 1]
    assert len(ds._handles) == 1, "the LRU cache closes the least recently used slide"
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._handles) == 0
    np.testing.assert_array_equal(np.asarray(clone[0][0]), np.asarray(ds[0][0]))
    # A forked worker sees a different pid and must open its own handle.
    stale = next(iter(ds._handles.values()))
    ds._pid = -1
    ds[0]
    assert ds._pid == os.getpid() and stale not in ds._handles.values()
    ds.close()
    assert not ds._handles


def test_dataloader_workers(data):
    torch = pytest.importorskip("torch")
    root, _ = data
    ds = WSICoordsDataset(root / "slides", root / "out" / "coords", transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batch, targets = next(iter(loader))
    assert batch.shape == (4, 128, 128, 3) and targets.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(batch[1].numpy(), np.asarray(ds.get_image(1)))


def test_clear_errors(data, tmp_path):
    root, _ = data
    coords_dir = tmp_path / "coords"
    write_coords_h5(coords_dir / "ghost_slide.h5", np.array([[0, 0]]), {"patch_size": 128, "patch_level": 0})
    with pytest.raises(FileNotFoundError, match="ghost_slide.h5"):
        WSICoordsDataset(root / "slides", coords_dir)
    with pytest.raises(FileNotFoundError, match="slide folder"):
        WSICoordsDataset(tmp_path / "nope", coords_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .h5"):
        WSICoordsDataset(root / "slides", empty)
    # A coords file without CLAM's attributes names the missing key.
    import h5py

    bad = tmp_path / "bad"
    bad.mkdir()
    with h5py.File(bad / "slide_a.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((1, 2), np.int64))
    with pytest.raises(KeyError, match="patch_size"):
        WSICoordsDataset(root / "slides", bad)


def test_training_finds_every_slide_format_the_patcher_takes_and_refuses_duplicate_ids(tmp_path):
    # One definition of slide extensions and discovery: a .bif slide that create_patches patched is found
    # at training time (it was not), and two slides with one id are an error here too (it kept the first).
    from dino.data.wsi.patching import SLIDE_EXTENSIONS

    assert {".vms", ".bif", ".svslide"} <= set(SLIDE_EXTENSIONS)
    slides, coords_dir = tmp_path / "slides", tmp_path / "coords"
    (slides / "sub").mkdir(parents=True)
    coords_dir.mkdir()
    (slides / "s1.bif").write_bytes(b"")  # discovery only: nothing is read in the constructor
    write_coords_h5(coords_dir / "s1.h5", np.array([[0, 0]]), {"patch_size": 128, "patch_level": 0})
    assert WSICoordsDataset(slides, coords_dir).slide_paths == [str(slides / "s1.bif")]
    (slides / "sub" / "s1.svs").write_bytes(b"")
    with pytest.raises(ValueError, match="share an id"):
        WSICoordsDataset(slides, coords_dir)
