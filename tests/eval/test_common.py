import argparse
import json
import os

import h5py
import numpy as np
import pytest

from eval import common


def test_features_roundtrip_decodes_strings(tmp_path):
    path = str(tmp_path / "f.h5")
    feats = np.random.default_rng(0).normal(size=(5, 3))
    common.save_features_h5(path, feats, barcode=np.array(["a", "b", "c", "d", "é"]), coords=np.arange(10).reshape(5, 2))
    out = common.load_features_h5(path)
    assert out["features"].dtype == np.float32
    np.testing.assert_allclose(out["features"], feats.astype(np.float32))
    assert list(out["barcode"]) == ["a", "b", "c", "d", "é"] and isinstance(out["barcode"][0], str)
    np.testing.assert_array_equal(out["coords"], np.arange(10).reshape(5, 2))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_decodes_fixed_length_bytes(tmp_path):
    path = str(tmp_path / "f.h5")
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((2, 2), np.float32)
        f["barcode"] = np.array([b"AAA-1", b"CC-1"])
    assert list(common.load_features_h5(path)["barcode"]) == ["AAA-1", "CC-1"]


def test_save_rejects_row_mismatch_and_load_names_problems(tmp_path):
    with pytest.raises(ValueError, match="barcode"):
        common.save_features_h5(str(tmp_path / "x.h5"), np.zeros((3, 2)), barcode=np.array(["a"]))
    assert not os.path.exists(tmp_path / "x.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        common.load_features_h5(str(tmp_path / "missing.h5"))
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(KeyError, match="features"):
        common.load_features_h5(str(tmp_path / "nofeat.h5"))
    (tmp_path / "corrupt.h5").write_bytes(b"not an h5 file")
    with pytest.raises(OSError, match="corrupt.h5"):
        common.load_features_h5(str(tmp_path / "corrupt.h5"))


def test_write_report_json_and_markdown(tmp_path):
    paths = common.write_report(str(tmp_path), "res", {"pcc": np.float32(0.5), "bad": float("nan"), "n": np.int64(3)},
                                [{"model": "m", "pcc": 0.123456}], title="T", notes=["a note"])
    data = json.loads(open(paths["json"]).read())
    assert data == {"pcc": 0.5, "bad": None, "n": 3, "warnings": []}
    md = open(paths["md"]).read()
    assert md.startswith("# T") and "| model | pcc |" in md and "0.1235" in md and "- a note" in md


def test_common_args_and_seed():
    p = common.add_common_args(argparse.ArgumentParser())
    a = p.parse_args(["--out-dir", "o", "--seed", "3"])
    assert (a.out_dir, a.seed) == ("o", 3)
    common.set_seed(1)
    x = np.random.rand(3)
    common.set_seed(1)
    np.testing.assert_array_equal(x, np.random.rand(3))


def test_save_accepts_a_dataset_named_path(tmp_path):
    out = str(tmp_path / "f.h5")
    common.save_features_h5(out, np.zeros((2, 3)), path=np.array(["a.png", "b.png"]), label=np.array([0, 1]))
    d = common.load_features_h5(out)
    assert list(d["path"]) == ["a.png", "b.png"] and list(d["label"]) == [0, 1]
