import json
import math

import pytest
import torch
import torch.nn.functional as F

from eval.frequency_bias import (
    SSMParams, analytic_transfer, analyze, discretize, impulse_response, mamba_dt_init, real_kernel, s4d_init,
    main, scan_model, spectral_metrics, transfer_magnitude,
)



@pytest.mark.parametrize("method", ["zoh", "euler"])
def test_real_init_has_more_low_frequency_energy_than_complex(method):
    delta = mamba_dt_init(64, generator=torch.Generator().manual_seed(0))
    res = {k: analyze(SSMParams(k, s4d_init(k, 64, 16), delta, "init"), L=257, method=method) for k in ("s4d-real", "s4d-lin")}
    assert res["s4d-real"]["low_freq_energy"] > res["s4d-lin"]["low_freq_energy"] + 0.1
    assert res["s4d-real"]["centroid"] < res["s4d-lin"]["centroid"]
    assert res["s4d-real"]["total_variation"] < res["s4d-lin"]["total_variation"]


def test_one_state_impulse_response_is_geometric():
    A = torch.tensor([[-0.7 + 0j]], dtype=torch.complex128)
    B = torch.tensor([[2.0 + 0j]], dtype=torch.complex128)
    C = torch.tensor([[1.5 + 0j]], dtype=torch.complex128)
    delta = torch.tensor([0.3], dtype=torch.float64)
    Abar, Bbar = discretize(A, B, delta, "zoh")
    a = math.exp(-0.21)
    assert Abar.item().real == pytest.approx(a)
    assert Bbar.item().real == pytest.approx((a - 1) / -0.7 * 2.0)  # ZOH: (e^{dA} - 1) / A * B
    K = impulse_response(Abar, Bbar, C, 12)
    expected = torch.tensor([1.5 * (a - 1) / -0.7 * 2.0 * a ** t for t in range(12)], dtype=torch.float64)
    torch.testing.assert_close(K.real[0], expected)
    assert K.imag.abs().max() == 0
    _, Bbar_e = discretize(A, B, delta, "euler")
    assert Bbar_e.item().real == pytest.approx(0.3 * 2.0)


def test_fft_matches_analytic_transfer_function():
    g = torch.Generator().manual_seed(1)
    A = torch.complex(-torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1, 3 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    B = torch.complex(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64))
    C = torch.randn(3, 4, generator=g, dtype=torch.float64).to(torch.complex128)
    delta = torch.tensor([0.05, 0.2, 0.9], dtype=torch.float64)
    L = 17
    Abar, Bbar = discretize(A, B, delta)
    K = impulse_response(Abar, Bbar, C, L)
    omega = 2 * math.pi * torch.arange(L, dtype=torch.float64) / L
    torch.testing.assert_close(torch.fft.fft(K, dim=-1), analytic_transfer(Abar, Bbar, C, L, omega))
    # conjugate pairs: 2 Re K has |H| = |H_K(w) + conj(H_K(-w))|
    Hr = torch.fft.fft(real_kernel(K, A), dim=-1)
    H = torch.fft.fft(K, dim=-1)
    torch.testing.assert_close(Hr, H + H.conj()[:, (-torch.arange(L)) % L])


def test_spectral_metrics_on_known_spectra():
    flat = torch.ones(1, 11, dtype=torch.float64)
    m = spectral_metrics(flat, cutoff=0.1)  # 2 of 11 bins are "low"
    assert m["low_freq_energy"].item() == pytest.approx(2 / 11)
    assert m["centroid"].item() == pytest.approx(0.5)
    assert m["total_variation"].item() == 0
    dc = transfer_magnitude(torch.ones(1, 20, dtype=torch.float64))  # constant kernel: all energy at w = 0
    assert spectral_metrics(dc)["low_freq_energy"].item() == pytest.approx(1.0)


def test_scan_reads_mv_hybrid_double_bias_and_other_mixers():
    import mambavision

    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    mixer = m.blocks[0].mixer
    with torch.no_grad():
        mixer.dt_proj.bias.fill_(0.3)
    ssms = scan_model(m)
    assert len(ssms) == 1 and ssms[0].A.shape == (32, 16)  # depth 2: one Mamba block, one attention block
    torch.testing.assert_close(ssms[0].delta, F.softplus(torch.full((32,), 0.6, dtype=torch.float64)))
    torch.testing.assert_close(ssms[0].A.real, -torch.arange(1, 17, dtype=torch.float64).expand(32, 16))
    names = mambavision.list_models()
    if "vim_einfft" in names:
        v = mambavision.create_model("vim_einfft", img_size=32, patch_size=8, embed_dim=32, depth=2)
        s = scan_model(v)
        assert len(s) == 4 and sum(p.name.endswith("(bwd)") for p in s) == 2  # forward + backward per layer
        mix = v.layers[0].mixer
        torch.testing.assert_close(s[0].delta, F.softplus(mix.dt_proj.bias.detach().double()))  # bias applied once
        torch.testing.assert_close(s[1].delta, F.softplus(mix.dt_proj_b.bias.detach().double()))  # backward branch
    if "hydra_einfft" in names:
        h = mambavision.create_model("hydra_einfft", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, headdim=16)
        s = scan_model(h)
        assert len(s) == 2 and all(p.kind == "mamba2" and p.A.shape[1] == 1 for p in s)


def test_script_init_mode_and_tiny_model(tmp_path):
    res = main(["--out-dir", str(tmp_path / "init"), "--d-model", "16", "--seq-len", "65"])
    s = res["summary"]
    assert s["s4d-real"]["low_freq_energy"] > s["s4d-lin"]["low_freq_energy"]
    assert (tmp_path / "init" / "frequency_bias.png").stat().st_size > 0
    saved = json.loads((tmp_path / "init" / "frequency_bias.json").read_text())
    assert len(saved["mean_H"]["s4d-real"]) == 65 // 2 + 1

    res = main(["--model", "mv_hybrid", "--model-kwargs", "{\"img_size\": 32, \"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}",
                       "--seq-len", "17", "--out-dir", str(tmp_path / "model")])
    assert [r["source"] for r in res["layers"]] == ["model", "same Δ, S4D-Lin A"]
    assert res["layers"][0]["delta_mean"] == pytest.approx(math.log(2))  # fresh model: zero dt bias
    assert "| model |" in (tmp_path / "model" / "frequency_bias.md").read_text()
    with pytest.raises(SystemExit):
        main(["--model", "vit_12", "--model-kwargs", "{\"img_size\": 32, \"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}", "--out-dir", str(tmp_path / "vit")])


def test_image_driven_delta_and_bc(tmp_path):
    import mambavision
    from PIL import Image

    from eval.frequency_bias import data_driven_params

    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    mixer = m.blocks[0].mixer
    with torch.no_grad():  # zero dt weight: delta = softplus(2 * bias) whatever the input
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.fill_(0.25)
    (p, B, C), = data_driven_params(m, [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)])
    torch.testing.assert_close(p.delta, F.softplus(torch.full((32,), 0.5, dtype=torch.float64)))
    assert B.shape == C.shape == (32, 16) and torch.isfinite(B.real).all() and B.real.abs().sum() > 0

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = (torch.rand(40, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(img_dir / f"p{i}.png")
    (img_dir / "broken.png").write_bytes(b"not a png")
    res = main(["--model", "mv_hybrid", "--model-kwargs", "{\"img_size\": 32, \"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}",
                          "--delta-source", "images", "--image-dir", str(img_dir), "--img-size", "32", "--seq-len", "17",
                          "--out-dir", str(tmp_path / "o")])
    assert res["source"].endswith("3 images")  # the broken file is skipped and counted
    assert all(r["delta_from"] == "images" for r in res["layers"])


def test_image_driven_bc_average_the_blocks_tokens_not_the_mixers_padding():
    """MV_Hybrid's mixer pads its sequence (17 tokens -> 24) and runs x_proj channel-first; the averages are
    over the 17 real tokens, as a token-major recomputation of the release's mixer gives them."""
    import mambavision

    from eval.frequency_bias import data_driven_params

    torch.manual_seed(0)
    m = mambavision.create_model("mv_hybrid", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    mixer = m.blocks[0].mixer
    seen = []
    handle = mixer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    x = torch.randn(3, 3, 32, 32)
    (p, B, C), = data_driven_params(m, [x])
    handle.remove()
    h = seen[0]  # (3, 17, 32): the mixer's input
    assert h.shape[1] == 17
    with torch.no_grad():
        xs = F.linear(h, mixer.in_proj.weight).transpose(1, 2).chunk(2, dim=1)[0]
        xs = F.silu(F.conv1d(F.pad(xs, (1, 2)), mixer.conv1d_x.weight, groups=xs.shape[1]))
        dbl = F.linear(xs.transpose(1, 2), mixer.x_proj.weight).reshape(-1, mixer.x_proj.out_features).double()
    r, n = mixer.dt_rank, mixer.d_state
    torch.testing.assert_close(B.real[0], dbl[:, r:r + n].mean(0))
    torch.testing.assert_close(C.real[0], dbl[:, r + n:].mean(0))
