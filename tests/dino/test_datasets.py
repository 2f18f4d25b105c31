"""Training image datasets: a robust image folder and the synthetic H&E dataset."""
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

import dino.data.datasets as datasets
from dino.data.datasets import ImageFolderDataset, SyntheticDataset
from dino.data.datasets import folder as folder_mod
from dino.data.loaders import SeededSampleDataset
from dino.data.unreadable import UnreadableSampleError


@pytest.fixture(autouse=True)
def _private_listing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVHYBRID_CACHE_DIR", str(tmp_path / "cache"))


def _png_bytes(tmp_path, name="src.png"):
    p = tmp_path / name
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(p)
    return p.read_bytes()


@pytest.fixture
def messy_folder(tmp_path):
    """Readable images in odd modes, plus a zero-byte, a truncated and a garbage file."""
    root = tmp_path / "patches"
    root.mkdir()
    Image.fromarray(np.full((16, 16, 3), (200, 100, 150), np.uint8)).save(root / "a_rgb.png")
    Image.fromarray(np.full((16, 16), 77, np.uint8)).save(root / "b_gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (10, 20, 30, 255)  # top half opaque, bottom half transparent
    Image.fromarray(rgba).save(root / "c_rgba.png")
    (root / "d_zero.png").write_bytes(b"")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(root / "e_gray16.png")
    png = _png_bytes(tmp_path)
    (root / "f_truncated.png").write_bytes(png[: len(png) // 2])
    (root / "g_garbage.jpg").write_bytes(os.urandom(300))
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P").save(root / "h_palette.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(png)
    return root


def test_folder_names_and_counts_bad_files_and_converts_modes(messy_folder):
    ds = ImageFolderDataset(messy_folder)
    names = [os.path.basename(ds.path(i)) for i in range(len(ds))]
    assert names == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_zero.png", "e_gray16.png",
                     "f_truncated.png", "g_garbage.jpg", "h_palette.png"]  # sorted; .txt and hidden ignored
    assert ds.classes == [] and ds.num_skipped == 0
    good = [0, 1, 2, 4, 7]
    for _ in range(2):
        for i in (3, 5, 6):  # each bad file is named
            with pytest.raises(UnreadableSampleError, match=names[i]):
                ds[i]
    assert ds.num_skipped == 3  # counted once per file
    assert sorted(os.path.basename(p) for p in ds.skipped_paths) == ["d_zero.png", "f_truncated.png", "g_garbage.jpg"]
    items = {i: ds[i] for i in good}
    for img, target in items.values():
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (16, 16) and target == 0
    arr = {i: np.asarray(img) for i, (img, _) in items.items()}
    assert (arr[1] == 77).all()                                  # greyscale -> RGB
    assert (arr[2][:8] == (10, 20, 30)).all() and (arr[2][8:] == 255).all()  # alpha -> white glass
    assert (np.abs(arr[4].astype(int) - 128) <= 1).all()         # 16-bit rescaled, not clipped to 255
    assert arr[7].shape == (16, 16, 3) and arr[7][0, 1, 0] != arr[7][0, 0, 0]  # palette expanded


def test_loader_replaces_bad_files_deterministically(messy_folder, caplog):
    """Through the training wrapper, a bad file becomes a substitute drawn from (seed, position)."""
    ds = ImageFolderDataset(messy_folder)
    wrapped = SeededSampleDataset(ds, seed=4)
    with caplog.at_level(logging.WARNING, logger="dino"):
        first = [wrapped[(p, p % len(ds))] for p in range(16)]
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    again = [SeededSampleDataset(ImageFolderDataset(messy_folder), seed=4)[(p, p % len(ds))] for p in range(16)]
    for (sa, pa, ua), (sb, pb, ub) in zip(first, again):
        assert pa == pb and ua == ub
        np.testing.assert_array_equal(np.asarray(sa[0]), np.asarray(sb[0]))
    assert [u > 0 for _, _, u in first] == [i % 8 in (3, 5, 6) for i in range(16)]
    assert len(warned) == 3 and any("f_truncated.png" in w for w in warned)  # once per file and process


def test_folder_applies_transforms(messy_folder):
    ds = ImageFolderDataset(messy_folder, transform=lambda im: np.asarray(im).shape,
                            target_transform=lambda t: t + 10, extensions="png")
    assert len(ds) == 7  # the .jpg is excluded by extension
    assert ds[0] == ((16, 16, 3), 10)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    bad = tmp_path / "allbad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"")
    with pytest.raises(UnreadableSampleError, match="the data set looks broken"):
        SeededSampleDataset(ImageFolderDataset(bad), seed=0)[(0, 0)]
    ds = ImageFolderDataset(bad)
    with pytest.raises(IndexError):
        ds[3]


def test_folder_class_subfolders_and_recursion(tmp_path):
    root = tmp_path / "data"
    for cls, n in (("TUM", 2), ("ADI", 1), ("LYM/nested", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / cls / f"{i}.png")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["ADI", "LYM", "TUM"]
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 2, 2]
    assert ds.path(1).endswith("LYM/nested/0.png")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(root, recursive=False)


def test_folder_listing_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / f"{i}.png")
    assert len(ImageFolderDataset(root)) == 3
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1

    real_scan = folder_mod._scan
    monkeypatch.setattr(folder_mod, "_scan", lambda *a: pytest.fail("listing not reused"))
    assert len(ImageFolderDataset(root)) == 3

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "3.png")
    st = os.stat(root)
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    calls = []
    monkeypatch.setattr(folder_mod, "_scan", lambda *a: calls.append(1) or real_scan(*a))
    assert len(ImageFolderDataset(root)) == 4 and calls == [1]
    assert len(ImageFolderDataset(root, cache_listing=False)) == 4 and calls == [1, 1]


def test_synthetic_dataset_is_deterministic_and_balanced():
    ds = SyntheticDataset(length=12, seed=3, image_size=32, n_studies=2)
    assert len(ds) == 12 and ds.classes[0] == "TUMOR"
    img, label = ds[4]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert [ds[i][1] for i in range(12)] == [i % 6 for i in range(12)]
    again = SyntheticDataset(length=12, seed=3, image_size=32, n_studies=2)[4][0]
    assert np.asarray(img).tobytes() == np.asarray(again).tobytes()
    other = SyntheticDataset(length=12, seed=4, image_size=32, n_studies=2)[4][0]
    assert np.asarray(img).tobytes() != np.asarray(other).tobytes()
    t = SyntheticDataset(length=2, image_size=32, transform=lambda im: im.size, target_transform=str)
    assert t[1] == ((32, 32), "1")
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(ValueError, match="length"):
        SyntheticDataset(length=0)


def test_package_exports_and_lazy_wsi():
    assert datasets.ImageFolderDataset is ImageFolderDataset and datasets.SyntheticDataset is SyntheticDataset
    assert "WSICoordsDataset" in datasets.__all__
    with pytest.raises(AttributeError, match="NoSuchDataset"):
        datasets.NoSuchDataset


def test_dataset_strings_reach_these_classes(messy_folder):
    from dino.data.loaders import make_dataset

    syn = make_dataset("Synthetic:length=5:seed=1:image_size=32")
    assert isinstance(syn, SyntheticDataset) and len(syn) == 5 and syn[0][0].size == (32, 32)
    fold = make_dataset(f"Folder:root={messy_folder}:extensions=png:recursive=false")
    assert isinstance(fold, ImageFolderDataset) and len(fold) == 7


# ------------------------------------------------------------------------- scripts/make_demo_data.py
def _load_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_data"] = mod  # so its worker function pickles by reference
    spec.loader.exec_module(mod)
    return mod


TINY = dict(n_per_class=5, samples_per_study=2, spots_per_sample=9, n_genes=60, n_informative=12,
            n_slides=4, patches_per_slide=3)


def test_make_demo_data_writes_standard_layouts(tmp_path):
    import json

    import anndata
    import h5py
    import pandas as pd

    from dino.data.synthetic_tissue import CLASS_NAMES

    mdd = _load_script()
    out = tmp_path / "demo"
    summary = mdd.make_demo_data(out, image_size=32, seed=0, n_studies=2, workers=1, **TINY)
    assert [s["skipped"] for s in summary] == [False, False, False]
    assert sorted(p.name for p in out.iterdir()) == ["classification", "hest", "slides"]  # no temp folders left

    # Classification: PNGs + labels.csv, stratified split, readable as a class-folder dataset.
    labels = pd.read_csv(out / "classification" / "labels.csv")
    assert list(labels.columns) == ["path", "label", "study", "split"] and len(labels) == 5 * 6
    assert (labels.groupby("label")["split"].nunique() == 3).all()
    assert all((out / "classification" / p).is_file() for p in labels["path"])
    folder = ImageFolderDataset(out / "classification" / "images")
    assert folder.classes == sorted(CLASS_NAMES) and len(folder) == 30 and folder[0][0].size == (32, 32)

    # HEST layout: h5 barcodes line up with AnnData obs_names; leave-sample-out splits.
    hest = out / "hest"
    meta = pd.read_csv(hest / "meta.csv")
    assert list(meta.columns) == ["sample_id", "study"] and len(meta) == 4 and meta["study"].nunique() == 2
    var50 = json.loads((hest / "var_50genes.json").read_text())["genes"]
    truth = json.loads((hest / "ground_truth.json").read_text())
    assert len(var50) == 50 and len(truth["informative_genes"]) == 12 and truth["batch_strength"] == 0.3
    for sid, study in zip(meta["sample_id"], meta["study"]):
        with h5py.File(hest / "patches" / f"{sid}.h5", "r") as f:
            img, barcode, coords = f["img"][:], f["barcode"][:], f["coords"][:]
        assert img.shape == (9, 32, 32, 3) and img.dtype == np.uint8 and coords.shape == (9, 2)
        ad = anndata.read_h5ad(hest / "adata" / f"{sid}.h5ad")
        assert list(ad.obs_names) == [b.decode() for b in barcode]
        assert (ad.obs["study"] == study).all() and (ad.obs["sample_id"] == sid).all()
        assert set(var50) <= set(ad.var_names) and ad.n_vars == 60
        x = np.asarray(ad.X)
        assert (x >= 0).all() and (x == np.round(x)).all()  # raw counts
    tests = []
    for k in range(2):
        train = pd.read_csv(hest / "splits" / f"train_{k}.csv")
        test = pd.read_csv(hest / "splits" / f"test_{k}.csv")
        assert list(test.columns) == ["sample_id", "patches_path", "expr_path"]
        assert not set(train["sample_id"]) & set(test["sample_id"]) and len(train) + len(test) == 4
        assert all((hest / p).is_file() for p in [*test["patches_path"], *test["expr_path"]])
        tests += list(test["sample_id"])
    assert sorted(tests) == sorted(meta["sample_id"])  # every sample is tested exactly once

    # Slides: one bag per slide plus the clinical table.
    clinical = pd.read_csv(out / "slides" / "clinical.csv")
    assert list(clinical.columns) == ["slide_id", "patient_id", "time", "event", "label", "study", "risk"]
    assert set(clinical["label"]) <= {"MSI", "MSS"} and set(clinical["event"]) <= {0, 1}
    with h5py.File(out / "slides" / "patches" / f"{clinical['slide_id'][0]}.h5", "r") as f:
        assert f["img"].shape == (3, 32, 32, 3) and f["barcode"].shape == (3,) and f["coords"].shape == (3, 2)

    # Rerun: complete parts are skipped; changed parameters need force.
    again = mdd.make_demo_data(out, image_size=32, seed=0, n_studies=2, workers=1, **TINY)
    assert [s["skipped"] for s in again] == [True, True, True]
    with pytest.raises(FileExistsError, match="force"):
        mdd.make_demo_data(out, image_size=32, seed=1, n_studies=2, workers=1, parts=("slides",), **TINY)
    redo = mdd.make_demo_data(out, image_size=32, seed=1, n_studies=2, workers=1, parts=("slides",), force=True, **TINY)
    assert redo[0]["skipped"] is False


def test_make_demo_data_output_does_not_depend_on_workers():
    from dino.data.synthetic_tissue import SyntheticTissue

    mdd = _load_script()
    gen = SyntheticTissue(seed=0, image_size=16)
    jobs = [("patch", i, None, None) for i in range(64)]
    one, two = mdd._render(gen, jobs, workers=1), mdd._render(gen, jobs, workers=2)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(one, two))
    with pytest.raises(ValueError, match="unknown part"):
        mdd.make_demo_data("/nonexistent", parts=("wsi",))
