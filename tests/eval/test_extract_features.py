import os
import sys
import types

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from eval import extract_features as ef
from eval.common import HE_MEAN, HE_STD, load_features_h5

TINY = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
TINY_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _png(path, seed, size=40):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _run(tmp_path, *extra):
    return ef.main(["--model", "mv_hybrid", "--random-init", "--model-kwargs", TINY, "--img-size", "32",
                    "--no-progress", "--out-dir", str(tmp_path / "rep"), "--batch-size", "3", *extra])


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for k in range(4):
        _png(str(root / "tumor" / f"t{k}.png"), k)
        _png(str(root / "normal" / f"n{k}.png"), 10 + k)
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_image_folder_features_labels_skips_and_matches_direct_forward(tmp_path, image_folder):
    out = str(tmp_path / "f.h5")
    summary = _run(tmp_path, "--images", str(image_folder), "--output", out)
    assert summary["n_extracted"] == 8 and summary["n_skipped"] == 1 and "broken.png" in summary["skipped"][0]
    d = load_features_h5(out)
    assert d["features"].shape == (8, 64)  # MV_Hybrid's default embedding: cat[CLS, mean patch] = 2 * 32
    assert sorted(set(d["label"])) == ["normal", "tumor"]
    # independent forward with the documented preprocessing (bicubic resize, H&E mean/std)
    torch.manual_seed(0)
    import mambavision

    model = mambavision.create_model("mv_hybrid", **TINY_KW).eval()
    i = list(d["path"]).index(os.path.join("tumor", "t1.png"))
    img = np.array(Image.open(image_folder / "tumor" / "t1.png").convert("RGB").resize((32, 32), Image.BICUBIC))
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - torch.tensor(HE_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(HE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x)[0].numpy()
        ff = model.forward_features(x)
    np.testing.assert_allclose(d["features"][i], ref, atol=1e-5)
    cls_mean = torch.cat([ff["x_norm_clstoken"], ff["x_norm_patchtokens"].mean(1)], -1)[0].numpy()
    np.testing.assert_allclose(d["features"][i], cls_mean, atol=1e-5)


def test_deterministic_and_resume(tmp_path, image_folder):
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    _run(tmp_path, "--images", str(image_folder), "--output", a)
    _run(tmp_path, "--images", str(image_folder), "--output", b)
    np.testing.assert_array_equal(load_features_h5(a)["features"], load_features_h5(b)["features"])
    mtime = os.path.getmtime(a)
    assert _run(tmp_path, "--images", str(image_folder), "--output", a)["resumed"]
    assert os.path.getmtime(a) == mtime


def test_csv_relative_paths_keep_columns_and_embeddings(tmp_path, image_folder):
    rows = [{"path": f"imgs/tumor/t{k}.png", "label": 1, "split": "train" if k < 3 else "test"} for k in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    dims = {}
    for emb in ("cls", "mean", "cls+mean"):
        out = str(tmp_path / f"{emb}.h5")
        _run(tmp_path, "--csv", str(tmp_path / "labels.csv"), "--output", out, "--embedding", emb)
        d = load_features_h5(out)
        dims[emb] = d["features"].shape[1]
        assert list(d["split"]) == ["train", "train", "train", "test"] and list(d["label"]) == [1, 1, 1, 1]
    assert dims == {"cls": 32, "mean": 32, "cls+mean": 64}
    cm, c, m = (load_features_h5(str(tmp_path / f"{e}.h5"))["features"] for e in ("cls+mean", "cls", "mean"))
    np.testing.assert_allclose(cm, np.concatenate([c, m], 1), atol=1e-6)


def _patch_file(path, n, with_barcode=True, size=32, seed=0):
    with h5py.File(path, "w") as f:
        f["img"] = np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        f["coords"] = np.arange(2 * n).reshape(n, 2)
        if with_barcode:
            f["barcode"] = np.array([f"bc{i}".encode() for i in range(n)])


def test_hest_patches_and_patch_bags_per_sample_with_resume_and_corrupt_file(tmp_path):
    src = tmp_path / "patches"
    src.mkdir()
    _patch_file(src / "SAMPLE_A.h5", 7)
    _patch_file(src / "slide_B.h5", 5, with_barcode=False, size=48, seed=1)  # a patch bag; resized to 32
    (src / "corrupt.h5").write_bytes(b"garbage")
    out = tmp_path / "feats"
    s = _run(tmp_path, "--hest-patches", str(src), "--output", str(out))
    assert (s["n_done"], s["n_failed"], s["n_patches"]) == (2, 1, 12) and "corrupt.h5" in s["failed"][0]
    a = load_features_h5(str(out / "SAMPLE_A.h5"))
    assert a["features"].shape == (7, 64) and list(a["barcode"]) == [f"bc{i}" for i in range(7)]
    np.testing.assert_array_equal(a["coords"], np.arange(14).reshape(7, 2))
    b = load_features_h5(str(out / "slide_B.h5"))
    assert b["features"].shape == (5, 64) and "barcode" not in b
    s2 = _run(tmp_path, "--hest-patches", str(src), "--output", str(out))
    assert (s2["n_done"], s2["n_resumed"]) == (0, 2)


def test_checkpoint_load_reproduces_the_same_model(tmp_path, image_folder):
    import mambavision

    torch.manual_seed(0)
    model = mambavision.create_model("mv_hybrid", **TINY_KW)
    ckpt = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    a, b = str(tmp_path / "rand.h5"), str(tmp_path / "ckpt.h5")
    _run(tmp_path, "--images", str(image_folder), "--output", a, "--seed", "0")
    ef.main(["--model", "mv_hybrid", "--checkpoint", str(ckpt), "--model-kwargs", TINY, "--img-size", "32",
             "--no-progress", "--images", str(image_folder), "--output", b, "--out-dir", str(tmp_path / "rep")])
    np.testing.assert_allclose(load_features_h5(a)["features"], load_features_h5(b)["features"], atol=1e-6)


def test_clear_errors(tmp_path, image_folder):
    base = ["--images", str(image_folder), "--output", str(tmp_path / "x.h5")]
    with pytest.raises(ValueError, match="multiple of the model's patch size 8"):
        _run(tmp_path, *base[:4], "--img-size", "36")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _run(tmp_path, *base, "--dtype", "bf16", "--device", "cpu")
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        ef.main(["--model", "mv_hybrid", *base])
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        ef.main(["--model", "nope", "--random-init", *base])
    with pytest.raises(ValueError, match="exactly one input"):
        _run(tmp_path, "--output", str(tmp_path / "x.h5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        _run(tmp_path, "--images", str(tmp_path / "empty"), "--output", str(tmp_path / "y.h5"))
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="no 'path' column"):
        _run(tmp_path, "--csv", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "z.h5"))


def test_wsi_one_clam_file_per_slide(tmp_path, monkeypatch):
    """The per-slide loop over WSICoordsDataset, with a stand-in dataset (no OpenSlide needed)."""

    class FakeWSI(torch.utils.data.Dataset):
        def __init__(self, slides, coords, transform=None):
            self.slide_paths = [os.path.join(slides, "s1.svs"), os.path.join(slides, "s2.svs")]
            self.slide_index = np.array([0, 0, 0, 1, 1])
            self.coords = np.arange(10).reshape(5, 2) * 256
            self.transform = transform

        def __len__(self):
            return 5

        def __getitem__(self, i):
            img = Image.fromarray(np.full((64, 64, 3), 20 * i, np.uint8))
            return self.transform(img), 0

    mod = types.ModuleType("dino.data.datasets.wsi_coords")
    mod.WSICoordsDataset = FakeWSI
    monkeypatch.setitem(sys.modules, "dino.data.datasets.wsi_coords", mod)
    out = tmp_path / "slide_feats"
    s = _run(tmp_path, "--wsi", str(tmp_path), "--coords", str(tmp_path), "--output", str(out))
    assert (s["n_slides"], s["n_done"], s["n_patches"]) == (2, 2, 5)
    f1, f2 = load_features_h5(str(out / "s1.h5")), load_features_h5(str(out / "s2.h5"))
    assert f1["features"].shape == (3, 64) and f2["features"].shape == (2, 64)
    np.testing.assert_array_equal(f2["coords"], np.arange(6, 10).reshape(2, 2) * 256)
    assert not np.allclose(f1["features"][0], f1["features"][1])  # each patch gets its own embedding


def test_wsi_end_to_end_with_openslide(tmp_path):
    """Slides (pyramidal TIFF from the synthetic generator) -> create_patches -> CLAM feature h5 per slide."""
    import subprocess

    from scripts.synthetic_cohort import SyntheticCohort
    from dino.data.wsi.pyramid_tiff import write_pyramidal_tiff

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    slides = tmp_path / "slides"
    slides.mkdir()
    gen = SyntheticCohort(seed=0)
    for i in range(2):
        write_pyramidal_tiff(slides / f"slide{i}.tif", gen.slide_image(1024, index=i).image, mpp=0.5, n_levels=2)
    r = subprocess.run([sys.executable, "scripts/create_patches.py", "--source", str(slides), "--save-dir",
                        str(tmp_path / "patches"), "--patch-size", "128", "--a-t", "0.05", "--no-progress"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "feats"
    _run(tmp_path, "--wsi", str(slides), "--coords", str(tmp_path / "patches" / "coords"), "--output", str(out))
    for i in range(2):
        with h5py.File(tmp_path / "patches" / "coords" / f"slide{i}.h5") as c, h5py.File(out / f"slide{i}.h5") as f:
            assert len(c["coords"]) > 0
            np.testing.assert_array_equal(f["coords"][()], c["coords"][()])
            assert f["features"].shape == (len(c["coords"]), 64) and np.isfinite(f["features"][()]).all()


# ---------------------------------------------------------------- provenance and faults (issue 15)
def _tiny_checkpoint(path, seed):
    import mambavision

    torch.manual_seed(seed)
    model = mambavision.create_model("mv_hybrid", **TINY_KW)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _ckpt_run(tmp_path, ckpt, *extra):
    return ef.main(["--model", "mv_hybrid", "--checkpoint", str(ckpt), "--model-kwargs", TINY, "--img-size", "32",
                    "--no-progress", "--out-dir", str(tmp_path / "rep"), *extra])


def test_outputs_record_model_digest_preprocessing_and_refuse_another_model(tmp_path, image_folder):
    import hashlib

    a, b = _tiny_checkpoint(tmp_path / "a.pth", 0), _tiny_checkpoint(tmp_path / "b.pth", 1)
    out = str(tmp_path / "f.h5")
    _ckpt_run(tmp_path, a, "--images", str(image_folder), "--output", out)
    with h5py.File(out) as f:
        attrs = dict(f.attrs)
    assert attrs["model"] == "mv_hybrid" and attrs["img_size"] == "32" and attrs["embedding"] == "default"
    assert attrs["checkpoint_sha256"] == hashlib.sha256(open(a, "rb").read()).hexdigest()
    assert _ckpt_run(tmp_path, a, "--images", str(image_folder), "--output", out)["resumed"]  # same model: reused
    with pytest.raises(ValueError, match=r"f.h5 was extracted differently \(checkpoint_sha256: "):
        _ckpt_run(tmp_path, b, "--images", str(image_folder), "--output", out)
    with pytest.raises(ValueError, match=r"random_init_seed: '' in the file, '0' now"):
        _run(tmp_path, "--images", str(image_folder), "--output", out)
    with pytest.raises(ValueError, match=r"img_size: '32' in the file, '64' now"):
        _ckpt_run(tmp_path, a, "--images", str(image_folder), "--output", out, "--img-size", "64")
    _ckpt_run(tmp_path, b, "--images", str(image_folder), "--output", out, "--overwrite")
    with h5py.File(out) as f:
        assert f.attrs["checkpoint_sha256"] == hashlib.sha256(open(b, "rb").read()).hexdigest()


def test_per_sample_outputs_refuse_another_model_and_unrecorded_files(tmp_path):
    src = tmp_path / "patches"
    src.mkdir()
    _patch_file(src / "S1.h5", 4)
    out = tmp_path / "feats"
    _run(tmp_path, "--hest-patches", str(src), "--output", str(out))
    with pytest.raises(ValueError, match=r"S1.h5 was extracted differently \(random_init_seed: '0' in the file, '3' now"):
        _run(tmp_path, "--hest-patches", str(src), "--output", str(out), "--seed", "3")
    with h5py.File(out / "S1.h5", "a") as f:  # a file from before provenance was recorded
        for k in list(f.attrs):
            del f.attrs[k]
    with pytest.raises(ValueError, match="S1.h5 records no model or checkpoint"):
        _run(tmp_path, "--hest-patches", str(src), "--output", str(out))


def test_refused_checkpoint_does_not_relay_weights_only_false(tmp_path, image_folder):
    bad = tmp_path / "pickled.pth"
    torch.save({"teacher": {}, "obj": types.SimpleNamespace(a=1)}, bad)
    with pytest.raises(ValueError, match="refused checkpoint .*pickled.pth") as e:
        _ckpt_run(tmp_path, bad, "--images", str(image_folder), "--output", str(tmp_path / "x.h5"))
    assert "weights_only=False" not in str(e.value) and "weights_only` set to `False" not in str(e.value)


def test_output_path_of_the_wrong_kind_is_named(tmp_path, image_folder):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile exists and is a file; --hest-patches writes one .h5 per"):
        _run(tmp_path, "--hest-patches", str(tmp_path), "--output", str(tmp_path / "afile"))
    with pytest.raises(IsADirectoryError, match="is a folder; --images writes one .h5 file"):
        _run(tmp_path, "--images", str(image_folder), "--output", str(tmp_path))
    with pytest.raises(NotADirectoryError, match="output folder .*afile exists and is a file"):
        ef.main(["--model", "mv_hybrid", "--random-init", "--model-kwargs", TINY, "--img-size", "32", "--no-progress",
                 "--images", str(image_folder), "--output", str(tmp_path / "o.h5"), "--out-dir", str(tmp_path / "afile")])


def test_wsi_bad_slide_is_skipped_and_counted(tmp_path, monkeypatch):
    """One slide whose tiles cannot be read: the others are written, the failure named in the summary."""

    class FakeWSI(torch.utils.data.Dataset):
        def __init__(self, slides, coords, transform=None):
            self.slide_paths = [os.path.join(slides, f"s{i}.svs") for i in range(3)]
            self.slide_index = np.array([0, 0, 1, 1, 2])
            self.coords = np.arange(10).reshape(5, 2)
            self.transform = transform

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if self.slide_index[i] == 1:
                raise RuntimeError(f"cannot read patch {i} of s1.svs: ZIPDecode")
            return self.transform(Image.fromarray(np.full((32, 32, 3), 9 * i, np.uint8))), 0

    mod = types.ModuleType("dino.data.datasets.wsi_coords")
    mod.WSICoordsDataset = FakeWSI
    monkeypatch.setitem(sys.modules, "dino.data.datasets.wsi_coords", mod)
    out = tmp_path / "feats"
    s = _run(tmp_path, "--wsi", str(tmp_path), "--coords", str(tmp_path), "--output", str(out))
    assert (s["n_done"], s["n_failed"]) == (2, 1) and "s1.svs" in s["failed"][0] and "ZIPDecode" in s["failed"][0]
    assert sorted(os.listdir(out)) == ["s0.h5", "s2.h5"]
    assert "ZIPDecode" in open(tmp_path / "rep" / "extract_features.md").read()


def test_extraction_defaults_to_the_normalisation_the_checkpoint_was_trained_with(tmp_path):
    """One source for the normalisation: the trainer records it in the teacher checkpoint, load_pretrained
    exposes it as pretrained_cfg, extraction uses it; checkpoints without a record get the H&E stats."""
    import torch

    import mambavision
    from dino.train import train as train_mod
    from eval.extract_features import resolve_normalization

    out = tmp_path / "run"
    train_mod.main(["--config-file", "configs/demo/tiny.yaml", "--output-dir", str(out),
                    "augmentations.mean=[0.1,0.2,0.3]", "augmentations.std=[0.4,0.5,0.6]"])
    ckpt = str(out / "eval" / "training_3" / "teacher_checkpoint.pth")
    model = mambavision.load_pretrained(ckpt)
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and model.pretrained_cfg["normalization_source"] == "checkpoint"
    assert resolve_normalization(ckpt, None, None) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert resolve_normalization(ckpt, [0.5] * 3, [0.5] * 3) == ((0.5,) * 3, (0.5,) * 3)  # given wins (warned)

    bare = tmp_path / "released.pth"  # the paper's release: weights only
    torch.save({"teacher": torch.load(ckpt, weights_only=True)["teacher"]}, bare)
    assert resolve_normalization(str(bare), None, None) == (mambavision.HE_MEAN, mambavision.HE_STD)
    assert mambavision.load_pretrained(str(bare), "mv_hybrid", embed_dim=32, depth=2, num_heads=2,
                                       patch_size=8, img_size=32).pretrained_cfg["mean"] == mambavision.HE_MEAN
