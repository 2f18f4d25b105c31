"""Registry and one-call checkpoint loading."""
import pytest
import torch

import mambavision

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_unknown_model_and_override_are_named():
    with pytest.raises(KeyError, match="unknown model 'vit_99'.*mv_hybrid"):
        mambavision.create_model("vit_99")
    with pytest.raises(TypeError, match="embed_dimm"):
        mambavision.create_model("mv_hybrid", embed_dimm=32)


def test_overrides_apply():
    m = mambavision.create_model("vit_24", drop_path_rate=0.1, **TINY)
    assert m.n_blocks == 2 and m.embed_dim == 32 and m.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    assert mambavision.get_entry("mv_hybrid").paper_name == "MV_Hybrid"


@pytest.fixture
def tiny_model():
    torch.manual_seed(1)
    return mambavision.create_model("mv_hybrid", **TINY)


def _same(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("layout", ["plain", "teacher", "training", "ddp"])
def test_load_pretrained_layouts(tmp_path, tiny_model, layout):
    sd = tiny_model.state_dict()
    head = {"dino_head.last_layer.weight": torch.zeros(3, 3)}
    ckpt = {
        "plain": sd,
        # the release's teacher_checkpoint.pth layout
        "teacher": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head}},
        "training": {"model": {**{f"student.backbone.{k}": v + 1 for k, v in sd.items()},
                               **{f"teacher.backbone.{k}": v for k, v in sd.items()}}, "iteration": 3},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    m = mambavision.load_pretrained(str(path), "mv_hybrid", num_heads=2, img_size=32)
    assert not m.training
    assert m.embed_dim == 32 and m.n_blocks == 2 and m.patch_size == 8  # inferred from the weights
    _same(m, tiny_model)


def test_backbone_config_makes_name_optional(tmp_path, tiny_model):
    path = tmp_path / "teacher_checkpoint.pth"
    sd = {f"backbone.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"teacher": sd, "backbone_config": {"name": "mv_hybrid", "kwargs": TINY}}, path)
    _same(mambavision.load_pretrained(str(path)), tiny_model)


def test_mismatch_error_lists_keys(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["cls_token"] = torch.zeros(1, 1, 8)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError) as err:
        mambavision.load_pretrained(str(path), "mv_hybrid", num_heads=2)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "norm.weight" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "cls_token: checkpoint (1, 1, 8) vs model (1, 1, 32)" in msg


def test_errors_for_missing_file_unknown_arch_and_pickled_code(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        mambavision.load_pretrained(str(tmp_path / "nope.pth"), "mv_hybrid")
    path = tmp_path / "noarch.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(ValueError, match="pass name="):
        mambavision.load_pretrained(str(path))
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": torch.zeros(1)}, "obj": _Arbitrary()}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        mambavision.load_pretrained(str(evil), "mv_hybrid")


class _Arbitrary:
    pass


def test_eval_transform_matches_training_normalisation():
    from PIL import Image

    img = Image.new("RGBA", (300, 200), (179, 137, 169, 255))  # ~HE_MEAN * 255, not square, with alpha
    x = mambavision.eval_transform(224)(img)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([179, 137, 169]) / 255 - torch.tensor(mambavision.HE_MEAN)) / torch.tensor(mambavision.HE_STD)
    torch.testing.assert_close(x[:, 100, 100], expected.float(), atol=1e-3, rtol=0)
    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    assert m(mambavision.eval_transform(32)(img).unsqueeze(0)).shape == (1, 64)


def test_trainer_checkpoint_card_rebuilds_without_reading_the_weights(tmp_path, tiny_model):
    """A checkpoint that stores the card and the complete config is rebuilt from them: nothing is inferred
    from the weights, and the card's recorded preprocessing travels with the model."""
    from mambavision.pretrained import checkpoint_card, checkpoint_normalization

    card = mambavision.get_card("mv_hybrid").with_normalization((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "training config")
    cfg = {**mambavision.get_entry("mv_hybrid").default_cfg, **TINY}
    path = tmp_path / "teacher_checkpoint.pth"
    sd = {f"backbone.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"teacher": sd, "backbone_config": {"name": "mv_hybrid", "kwargs": cfg, "card": card.to_dict()}}, path)
    m = mambavision.load_pretrained(str(path))
    _same(m, tiny_model)
    assert m.card.mean == (0.5, 0.4, 0.3) and m.card.normalization_source == "checkpoint"
    assert m.card.pool == "cls+mean" and m.pretrained_cfg["std"] == (0.2, 0.2, 0.2)
    assert checkpoint_card(str(path)) == m.card
    assert checkpoint_normalization(str(path)) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    # the stored config is authoritative: a wrong depth there is a clear mismatch, not silently "fixed"
    torch.save({"teacher": sd, "backbone_config": {"name": "mv_hybrid", "kwargs": {**cfg, "depth": 3},
                                                   "card": card.to_dict()}}, path)
    with pytest.raises(RuntimeError, match="missing keys"):
        mambavision.load_pretrained(str(path))


def test_released_layout_infers_depth_through_the_card(tmp_path):
    """The paper's release records no configuration; depth comes from the deepest block the weights hold
    (found with the card on a meta-device copy), so a depth-3 checkpoint loads strictly."""
    torch.manual_seed(0)
    m3 = mambavision.create_model("mv_hybrid", **{**TINY, "depth": 3})
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in m3.state_dict().items()}}, path)
    loaded = mambavision.load_pretrained(str(path), "mv_hybrid", num_heads=2, img_size=32)
    assert loaded.n_blocks == 3 and loaded.model_cfg["depth"] == 3
    assert loaded.card == mambavision.get_card("mv_hybrid")  # nothing recorded: the registry's H&E card
    _same(loaded, m3)
