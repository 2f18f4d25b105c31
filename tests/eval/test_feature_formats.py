"""Feature files as the peers write them are read natively and auto-detected; anything else is named."""
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from eval import common
from eval import gene_expression as ge
from eval.slide_cv import BagStore


def write_hest_embeddings(path, x, barcodes):
    """HEST-Benchmark's embed_tiles + save_hdf5: (N, 1) byte barcodes, resizable chunked datasets, appended batches."""
    for k, rows in enumerate(np.array_split(np.arange(len(x)), 2)):
        with h5py.File(path, "w" if k == 0 else "a") as f:
            for key, val in (("embeddings", x[rows]), ("barcodes", np.array([[b.encode()] for b in barcodes[rows]])),
                             ("coords", np.stack([rows, rows], 1))):
                if key not in f:
                    f.create_dataset(key, data=val, chunks=True, maxshape=(None,) + val.shape[1:])
                else:
                    f[key].resize(len(f[key]) + len(val), axis=0)
                    f[key][-len(val):] = val


def write_clam(path, x, coords):
    """CLAM's extract_features_fp.py: features (N, D) float32 and coords (N, 2) via save_hdf5 in append mode."""
    with h5py.File(path, "w") as f:
        for key, val in (("features", x), ("coords", coords)):
            f.create_dataset(key, data=val, chunks=(1,) + val.shape[1:], maxshape=(None,) + val.shape[1:])


def write_trident(path, x, coords):
    """Trident's WSI.extract_patch_features + IO.save_h5: attributes on features (name, encoder) and coords."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=x, chunks=(1,) + x.shape[1:], maxshape=(None,) + x.shape[1:])
        d.attrs.update({"name": "slide1", "savetodir": "/tmp/x", "encoder": "conch_v15"})
        c = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
        c.attrs.update({"patch_size": 256, "level0_magnification": 40, "target_magnification": 20})


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype(np.float32), np.arange(12).reshape(6, 2), np.array([f"bc{i}" for i in range(6)])


@pytest.mark.parametrize("fmt", ["hest", "clam", "trident", "mvhybrid"])
def test_each_layout_is_detected_and_read(tmp_path, arrays, fmt):
    x, coords, bc = arrays
    path = str(tmp_path / f"{fmt}.h5")
    if fmt == "hest":
        write_hest_embeddings(path, x, bc)
    elif fmt == "clam":
        write_clam(path, x, coords)
    elif fmt == "trident":
        write_trident(path, x, coords)
    else:
        common.save_features_h5(path, x, coords=coords, barcode=bc)
    d = common.load_features_h5(path)
    assert d["_format"] == fmt
    np.testing.assert_array_equal(d["features"], x)
    if fmt in ("hest", "mvhybrid"):
        assert list(d["barcode"]) == list(bc)  # (N, 1) bytes flattened and decoded
    if fmt != "hest":
        np.testing.assert_array_equal(d["coords"], coords)
    # slide bags (survival, ABMIL) read the same files
    store = BagStore([path])
    np.testing.assert_array_equal(store(0).numpy(), x)


def test_unknown_layout_names_file_datasets_and_accepted(tmp_path):
    path = str(tmp_path / "odd.h5")
    with h5py.File(path, "w") as f:
        f["feats"] = np.zeros((2, 2))
        f["embeddings"] = np.zeros((2, 2))  # HEST's name, but no barcodes
    for load in (common.load_features_h5, lambda p: BagStore([p])):
        with pytest.raises(KeyError) as e:
            load(path)
        msg = str(e.value)
        assert "odd.h5" in msg and "['embeddings', 'feats']" in msg and "HEST" in msg and "Trident" in msg


def test_split_csv_patches_path_and_expr_path_are_honoured(tmp_path):
    """Features named after the split CSV's patches_path (what extract_features --hest-patches writes) and
    expression files at expr_path outside adata/ are found."""
    import anndata

    task, feats = tmp_path / "task", tmp_path / "feats"
    for d in (task / "splits", task / "expr_elsewhere", feats):
        d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(4)]
    ids = ["A", "B", "C"]
    for sid in ids:
        bc = np.array([f"{sid}{i:02d}" for i in range(20)])
        anndata.AnnData(X=rng.poisson(3, size=(20, 4)).astype(np.float32), obs=pd.DataFrame(index=bc),
                        var=pd.DataFrame(index=genes)).write_h5ad(task / "expr_elsewhere" / f"st_{sid}.h5ad")
        write_hest_embeddings(str(feats / f"patch_{sid}.h5"), rng.normal(size=(20, 6)).astype(np.float32), bc)
    for k, test in enumerate(ids):
        for name, part in (("train", [s for s in ids if s != test]), ("test", [test])):
            pd.DataFrame({"sample_id": part, "patches_path": [f"patches/patch_{s}.h5" for s in part],
                          "expr_path": [f"expr_elsewhere/st_{s}.h5ad" for s in part]}).to_csv(
                task / "splits" / f"{name}_{k}.csv", index=False)
    (task / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    res = ge.main(["--task-dir", str(task), "--features-dir", str(feats), "--split", "hest", "--out-dir",
                   str(tmp_path / "out")])
    assert res["protocol"]["n_spots"] == 60 and res["modes"]["hest"]["summary"]["n_folds"] == 3
    os.remove(feats / "patch_B.h5")
    with pytest.raises(FileNotFoundError, match="sample B: tried .*B.h5, .*patch_B.h5"):
        ge.load_hest_task(str(task), str(feats))
