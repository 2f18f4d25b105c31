import json

import numpy as np
import pytest

from eval import retrieval
from eval.common import save_features_h5
from eval.retrieval import knn_retrieval, knn_search, majority_vote, main, map_at_k, prototype_retrieval


def unit(deg, r=1.0):
    return r * np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


# Database on the unit circle (some rows rescaled: cosine must not care), labels A B A B B.
DB = np.stack([unit(0, 3.0), unit(20), unit(40, 0.5), unit(60), unit(90, 7.0)])
DB_Y = np.array(["A", "B", "A", "B", "B"])
Q = np.stack([unit(1), unit(89, 2.0)])
Q_Y = np.array(["B", "A"])


def test_hand_computed_knn_metrics():
    _, idx = knn_search(Q, DB, 5, backend="torch")
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    res = knn_retrieval(Q, Q_Y, DB, DB_Y, ks=(1, 2, 3, 5), backend="torch")
    o = res["overall"]
    # query 0 sees A B A B B; query 1 sees B B A B A
    assert o["top1_acc"] == 0.0 and o["top3_acc"] == 1.0 and o["top5_acc"] == 1.0
    assert o["mv@2_acc"] == 0.0  # q0: tie A/B -> nearest is A (wrong); q1: B B (wrong)
    assert o["mv@5_acc"] == 0.5  # q0: B wins 3-2 (right); q1: B wins 3-2 (wrong)
    # AP@3: q0 hit at rank 2 -> (1/2)/min(3, 3 B's); q1 hit at rank 3 -> (1/3)/min(3, 2 A's)
    assert o["mAP@3"] == pytest.approx(((1 / 2) / 3 + (1 / 3) / 2) / 2)
    # AP@5: q0 hits at 2,4,5 -> (1/2+2/4+3/5)/3; q1 hits at 3,5 -> (1/3+2/5)/2
    assert o["mAP@5"] == pytest.approx(((1 / 2 + 2 / 4 + 3 / 5) / 3 + (1 / 3 + 2 / 5) / 2) / 2)
    assert res["per_class"]["B"]["top3_acc"] == 1.0 and res["per_class"]["A"]["support"] == 1


def test_majority_vote_tie_goes_to_nearest():
    nbr = np.array([[2, 1, 1, 2, 3], [3, 1, 2, 3, 1], [5, 5, 4, 4, 4]])
    np.testing.assert_array_equal(majority_vote(nbr, 4), [2, 3, 5])  # 2:2 tie->2, 3 vs 1 tie -> 3, 5 beats 4
    np.testing.assert_array_equal(majority_vote(nbr, 5), [2, 3, 4])


def test_map_without_relevant_items_is_zero():
    assert map_at_k(np.array([[1, 1]]), np.array([0]), 2, np.array([0])) == 0.0
    assert map_at_k(np.array([[0, 1]]), np.array([0]), 2, np.array([1])) == 1.0  # one relevant, found first


def brute_force(q, d, metric, exclude_self):
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        s = q @ d.T
    else:
        s = -((q[:, None, :] - d[None]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return s


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("loo", [False, True])
def test_blocked_search_matches_brute_force(metric, loo):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(53, 6)).astype(np.float32)
    q = d if loo else rng.normal(size=(29, 6)).astype(np.float32)
    s, i = knn_search(q, d, 7, metric=metric, exclude_self=loo, query_block=4, db_block=9, backend="torch")
    ref = brute_force(q.astype(np.float64), d.astype(np.float64), metric, loo)
    ref_i = np.argsort(-ref, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, np.take_along_axis(ref, ref_i, 1), rtol=1e-4, atol=1e-4)
    if loo:
        assert not (i == np.arange(len(q))[:, None]).any()


def test_ties_are_broken_by_database_index_across_blocks():
    d = np.tile(np.array([[1.0, 0.0]]), (10, 1))
    _, i = knn_search(np.array([[1.0, 0.0]]), d, 4, query_block=1, db_block=3, backend="torch")
    np.testing.assert_array_equal(i, [[0, 1, 2, 3]])


def test_bad_search_inputs():
    with pytest.raises(ValueError, match="same width"):
        knn_search(np.zeros((2, 3)), np.zeros((4, 2)), 1)
    with pytest.raises(ValueError, match="k=5"):
        knn_search(np.ones((4, 2)), np.ones((4, 2)), 5, exclude_self=True)
    if retrieval.faiss is None:
        with pytest.raises(ImportError, match="faiss"):
            knn_search(np.ones((2, 2)), np.ones((2, 2)), 1, backend="faiss")


def test_prototype_retrieval_matches_numpy():
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 8))
    sup_y = np.repeat(np.array(["x", "y", "z"]), 10)
    sup = centers[np.repeat(np.arange(3), 10)] + 0.8 * rng.normal(size=(30, 8))
    q_y = np.repeat(np.array(["x", "y", "z"]), [4, 7, 9])
    q = centers[np.searchsorted(["x", "y", "z"], q_y)] + 0.8 * rng.normal(size=(20, 8))
    res = prototype_retrieval(q, q_y, sup, sup_y)
    n = sup / np.linalg.norm(sup, axis=1, keepdims=True)
    protos = np.stack([n[sup_y == c].mean(0) for c in "xyz"])
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
    pred = np.array(list("xyz"))[sims.argmax(1)]
    assert res["accuracy"] == pytest.approx((pred == q_y).mean())
    assert res["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(q_y, pred))
    assert res["per_class_ap"]["y"] == pytest.approx(average_precision_score(q_y == "y", sims[:, 1]))
    assert res["balanced_accuracy"] > 0.8
    # support vectors are normalised before averaging: rescaling one changes nothing
    sup2 = sup.copy()
    sup2[0] *= 1000
    np.testing.assert_allclose(prototype_retrieval(q, q_y, sup2, sup_y)["similarities"], res["similarities"], rtol=1e-5)
    with pytest.raises(ValueError, match="no support"):
        prototype_retrieval(q, np.where(q_y == "x", "w", q_y), sup, sup_y)


def _clustered(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = 3 * np.eye(8)[y] + 0.5 * rng.normal(size=(n, 8))
    return X.astype(np.float32), np.array(["tum", "str", "lym"])[y]


def test_cli_split_two_files_and_loo(tmp_path):
    X, y = _clustered()
    split = np.where(np.arange(len(y)) < 45, "train", "test")
    f = tmp_path / "feats.h5"
    save_features_h5(str(f), X, label=y, split=split)
    res = main(["--features", str(f), "--split-key", "split", "--out-dir", str(tmp_path / "a"), "--backend", "torch"])
    assert res["n_query"] == 15 and res["n_database"] == 45
    assert res["knn"]["overall"]["top1_acc"] > 0.9 and res["prototype"]["balanced_accuracy"] > 0.9
    saved = json.loads((tmp_path / "a" / "retrieval.json").read_text())
    assert set(saved["knn"]["overall"]) >= {"top10_acc", "mv@5_acc", "mAP@3"}
    assert "| kNN k=1 |" in (tmp_path / "a" / "retrieval.md").read_text()
    assert (tmp_path / "a" / "retrieval.png").stat().st_size > 0

    save_features_h5(str(tmp_path / "q.h5"), X[45:], label=y[45:])
    save_features_h5(str(tmp_path / "d.h5"), X[:45], label=y[:45])
    res2 = main(["--query", str(tmp_path / "q.h5"), "--database", str(tmp_path / "d.h5"), "--out-dir", str(tmp_path / "b"),
                 "--backend", "torch", "--mode", "knn"])
    assert res2["knn"]["overall"] == res["knn"]["overall"]

    res3 = main(["--features", str(f), "--out-dir", str(tmp_path / "c"), "--mode", "knn", "--metric", "l2", "--ks", "1", "5"])
    assert res3["knn"]["mode"] == "leave-one-out" and res3["n_database"] == 60 and res3["knn"]["ks"] == [1, 5]

    with pytest.raises(KeyError, match="tissue"):
        main(["--features", str(f), "--label-key", "tissue", "--out-dir", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="'val'"):
        main(["--features", str(f), "--split-key", "split", "--query-split", "val", "--out-dir", str(tmp_path / "d")])
