"""pdiff tests: CPU only, real data (scikit-learn's digits, tiny MNIST files read by torchvision), real code paths.

    python -m pytest -q test_pdiff.py
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import pdiff

HERE = Path(__file__).resolve().parent
runner = CliRunner()
FAST_FIT = ["--ae-steps", "400", "--denoiser-steps", "800"]  # the suite's shorter fit; defaults are 1500 / 3000


def cli(*args):
    return runner.invoke(pdiff.app, [str(a) for a in args])


def folder_state(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())} if path.exists() else {}


def read(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The offline quick start through the CLI: mlp3 on digits, K=200 snapshots, a shorter fit."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    r = cli("collect", "--run", run)
    assert r.exit_code == 0, r.output
    r = cli("fit", "--run", run, *FAST_FIT)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="session")
def sampled(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    r = cli("sample", "--run", digits_run, "-n", 50, "--json", "--save", out / "gen.safetensors", "--plot", out / "plot.png")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), out


# ---------------------------------------------------------------------------------------------------- units


def test_wrong_iou_hand_checked():
    # model a gets examples 1, 2 wrong; model b gets 1, 3 wrong: intersection {1}, union {1, 2, 3}
    a = torch.tensor([[True, False, False, True]])
    b = torch.tensor([[True, False, True, False]])
    assert pdiff.wrong_iou(a, b).item() == pytest.approx(1 / 3)
    assert pdiff.wrong_iou(a, a).item() == 1.0
    assert pdiff.wrong_iou(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)).item() == 1.0


def test_layout_round_trip_and_strict_false_load():
    net, _, _ = pdiff.build_net("resnet18", 3, 32, 10)
    layout = pdiff.select_params(net, "norm")
    assert layout.names == ["layer4.1.bn1.weight", "layer4.1.bn1.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"]
    assert layout.D == 2048
    vec = torch.randn(layout.D)
    fresh, _, _ = pdiff.build_net("resnet18", 3, 32, 10)
    missing, unexpected = fresh.load_state_dict(layout.unflatten(vec), strict=False)
    assert unexpected == [] and missing and not set(layout.names) & set(missing)
    assert torch.equal(layout.flatten(fresh), vec)
    assert pdiff.select_params(net, "fc.*").names == ["fc.weight", "fc.bias"]
    with pytest.raises(pdiff.PdiffError):
        pdiff.select_params(net, "nothing.*")


@pytest.mark.parametrize("arch,size,params", [("mlp3", 8, "all"), ("convnet3", 8, "all"), ("resnet18", 16, "norm"),
                                               ("resnet18", 16, "layer3.1.bn2.*,fc.*"), ("convnext_tiny", 32, "norm"),
                                               ("vit_b_16", 16, "norm"), ("mobilenet_v3_small", 8, "norm")])
def test_batched_evaluation_equals_loop(arch, size, params):
    torch.manual_seed(0)
    net, ch, sz = pdiff.build_net(arch, 3, size, 10)
    net.eval()
    for m in net.modules():  # non-trivial running statistics, so eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    layout = pdiff.select_params(net, params)
    prep = pdiff.Prep([0.5] * 3, [0.25] * 3, ch, sz)
    x = torch.randint(0, 256, (12, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 10, (12,))
    base = layout.flatten(net)
    sets = base + 0.5 * base.abs().mean() * torch.randn(5, layout.D)
    sets[3, 0] = float("nan")  # a failed set: all wrong in both paths
    assert pdiff.eval_path(net, prep, layout, x) == "batched"  # the probe chose the fast path
    fast = pdiff.evaluate(net, prep, layout, sets, x, y, batch=5, memory=1 << 16)  # tiny budget: several chunks
    slow = pdiff.evaluate(net, prep, layout, sets, x, y, batch=5, path="loop")
    assert fast.shape == (5, 12)
    assert torch.equal(fast, slow)
    assert not fast[3].any()
    stages = pdiff.net_stages(net)
    if stages is not None:  # the stage list composes to the network's own forward
        h = prep(x)
        for _, m in stages:
            h = m(h)
        torch.testing.assert_close(h, net(prep(x)))


def test_schedule_buffers_and_q_sample():
    d = pdiff.Diffusion(1000)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(2e-2)
    assert d.alpha_bar[-1].item() < 1e-4  # x_T is pure noise
    assert d.alpha_bar_prev[0].item() == 1.0 and torch.equal(d.alpha_bar_prev[1:], d.alpha_bar[:-1])
    x0, eps, t = torch.tensor([[1.0, 2.0]] * 3), torch.tensor([[3.0, -1.0]] * 3), torch.tensor([0, 10, 999])
    ab = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)[t].float()[:, None]
    torch.testing.assert_close(d.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_diffusion_loss_is_zero_for_the_true_noise_only():
    d = pdiff.Diffusion(100)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    truth = lambda x_t, t: (x_t - d.alpha_bar[t].sqrt()[:, None] * x0) / (1 - d.alpha_bar[t]).sqrt()[:, None]
    assert d.loss(truth, x0, torch.Generator().manual_seed(0)).item() < 1e-8  # predicts exactly the noise drawn
    zero = d.loss(lambda x_t, t: torch.zeros_like(x_t), x0, torch.Generator().manual_seed(0)).item()
    assert zero == pytest.approx(1.0, abs=0.25)  # E[eps^2] = 1


def test_ddim_with_fewer_steps_than_T_and_the_clip_box():
    d = pdiff.Diffusion(1000)
    ts = d.ddim_times(20)
    assert len(ts) == 20 and ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    mu = torch.tensor([2.0, -1.0])  # a point mass: the exact noise prediction leads every path to it
    oracle = lambda x, t: (x - d.alpha_bar[t].sqrt()[:, None] * mu) / (1 - d.alpha_bar[t]).sqrt()[:, None]
    out = d.sample(oracle, 100, 2, torch.Generator().manual_seed(0), sampler="ddim", steps=20)
    torch.testing.assert_close(out, mu.expand(100, 2), atol=1e-4, rtol=0)
    lo, hi = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])  # a box that excludes mu: samples end on its edge
    out = d.sample(oracle, 100, 2, torch.Generator().manual_seed(0), sampler="ddim", steps=20, clip=(lo, hi))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]).expand(100, 2), atol=1e-4, rtol=0)
    x = torch.randn(5, 2)
    x0, eps = d.predict(oracle, x, 500, (lo, hi))  # the clamped x0 and its eps still give back x_t
    assert (x0 >= lo).all() and (x0 <= hi).all()
    torch.testing.assert_close(d.alpha_bar[500].sqrt() * x0 + (1 - d.alpha_bar[500]).sqrt() * eps, x)


def test_tensor_stats_centre_per_coordinate_and_scale_per_tensor():
    layout = pdiff.Layout(["a", "b"], [(2,), (1,)])
    x = torch.tensor([[1.0, 3.0, 10.0], [3.0, 5.0, 10.0]])  # tensor b never moves
    mean, std = pdiff.tensor_stats(layout, x)
    assert mean.tolist() == [2.0, 4.0, 10.0]
    assert std.tolist() == [1.0, 1.0, 1.0]  # a: RMS deviation 1 (each coordinate +-1); b: 0, so 1 (no scaling)
    mean, std = pdiff.tensor_stats(layout, torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 2.0]]))
    assert std.tolist() == pytest.approx([2 ** 0.5, 2 ** 0.5, 1.0])  # deviations (2, 0) -> RMS sqrt(2)


def test_augment_is_a_random_crop_and_flip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    out = pdiff.augment(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each image is one of the 5 x 5 crops of its padded self, flipped or not
        crops = [c for dy in range(5) for dx in range(5) for c in (padded[i, :, dy:dy + 6, dx:dx + 6],
                                                                   padded[i, :, dy:dy + 6, dx:dx + 6].flip(-1))]
        assert any(torch.equal(out[i], c) for c in crops)
    many = pdiff.augment(x[:1].expand(200, -1, -1, -1), torch.Generator().manual_seed(1), pad=2)
    assert len({m.numpy().tobytes() for m in many}) > 20  # really random: many distinct crops
    p = padded[0]
    flipped = sum(any(torch.equal(m, p[:, dy:dy + 6, dx:dx + 6].flip(-1)) for dy in range(5) for dx in range(5))
                  for m in many)
    assert 60 < flipped < 140  # about half of them flipped (a 6-wide image is never its own mirror here)


def test_baselines_are_made_from_the_training_originals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(26, 6, generator=g)  # rows 20-25 held out: no baseline may use them
    x[20:] += 100
    rows = list(range(20))
    layout = pdiff.Layout(["w"], [(6,)])
    ruler = pdiff.Ruler(x, torch.ones(20, 3, dtype=torch.bool), x[rows].mean(0), torch.ones(6), rows)
    make = lambda cfg: {k: grp.make(slice(0, grp.n)) for k, grp in pdiff.baselines(ruler, cfg.n, cfg, layout).items()}
    b = make(pdiff.SampleConfig(n=500, noise_std="0.5", average_m=20))
    torch.testing.assert_close(b["average"], x[rows].mean(0).expand(500, 6))  # m = K: every average is the mean
    torch.testing.assert_close(b["ensemble"], x[rows].mean(0, keepdim=True))
    assert (b["gaussian"].mean(0) - x[rows].mean(0)).abs().max() < 0.2
    assert (b["gaussian"].std(0) / x[rows].std(0) - 1).abs().max() < 0.12
    one = make(pdiff.SampleConfig(n=50, average_m=1))["average"]
    assert all(any(torch.equal(row, o) for o in x[rows]) for row in one)  # m = 1: each is one training original
    two = make(pdiff.SampleConfig(n=50, average_m=2))["average"]
    pairs = [(i, j) for i in rows for j in rows if i != j]
    assert all(any(torch.allclose(row, (x[i] + x[j]) / 2) for i, j in pairs) for row in two[:5])  # two distinct
    noise = b["noise-0.5"]  # a training original plus 0.5 of its values' std (the reference code's unit)
    resid = torch.stack([(row - x[rows]).norm(dim=1).min() for row in noise[:50]])
    assert resid.median().item() == pytest.approx(0.5 * x[rows].std(1).mean().item() * 6 ** 0.5, rel=0.3)
    chunks = pdiff.baselines(ruler, 500, pdiff.SampleConfig(n=500, noise_std="0.5"), layout)
    for k in ("noise-0.5", "gaussian"):  # made a chunk at a time: the same sets
        torch.testing.assert_close(torch.cat([chunks[k].make(slice(0, 7)), chunks[k].make(slice(7, 500))]), b[k])


def test_pairwise_iou_of_a_group():
    correct = torch.tensor([[True, False, False, True], [True, False, True, False], [True, True, True, True]])
    m = {k: torch.zeros(3, dtype=torch.float64) for k in ("max_iou", "nearest", "to_mean", "off_span")}
    got = pdiff.novelty(m, correct)["pairwise_iou"]
    # wrong sets {1, 2}, {1, 3}, {}: IoU 1/3, and 0 with the model that gets nothing wrong (union non-empty)
    assert got == pytest.approx((1 / 3 + 0 + 0) / 3, abs=1e-4)  # rounded to 4 places


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_reach_a_gaussian_target(sampler, eta):
    # data N(mu, s^2) per coordinate: x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and the exact noise prediction is
    # E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). With it every sampler must return
    # the target's mean and spread; a wrong posterior variance (x0.8 gives spreads ~0.89 of the target) or an
    # eps coefficient that ignores sigma (~3.3x) does not. All T steps: strided DDIM adds discretisation error
    # (50 steps: spreads 0.85-0.96 of the target), which is not what this test is about.
    d = pdiff.Diffusion(1000)
    mu, s = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([0.5, 1.5, 0.3, 1.0])

    def oracle(x, t):
        ab = d.alpha_bar[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    n = 4000
    out = d.sample(oracle, n, 4, torch.Generator().manual_seed(0), sampler=sampler, steps=None if sampler == "ddpm" else 1000,
                   eta=eta)
    assert ((out.mean(0) - mu).abs() < 4 * s / n**0.5).all(), out.mean(0)  # 4 standard errors
    assert ((out.std(0) / s - 1).abs() < 0.05).all(), out.std(0) / s


def test_snapshot_steps_and_the_v3_normalisation_mode():
    got = []
    after = pdiff.every(3, got.append, skip=1)  # after the first step, every third
    for step in range(10):
        after(step)
    assert got == [0, 1, 2]  # after steps 3, 6 and 9 (0-based)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    modes = []
    for step in range(4):
        pdiff.norm_mode(net, "v3", step)
        modes.append((net.training, net[1].training))
    assert modes == [(True, True), (True, True), (True, False), (True, False)]  # train twice, then eval
    pdiff.norm_mode(net, "eval", 0)
    assert net.training and not net[1].training


def test_protocol_v1_continues_stage1s_optimizer_with_a_snapshot_per_epoch(tmp_path):
    """--protocol v1 sets the v1 code's recipe (options given override it): SGD without Nesterov, lr 0.1 in steps,
    and stage 2 goes on with stage 1's optimizer, a snapshot after every epoch."""
    run = tmp_path / "v1"
    r = cli("collect", "--run", run, "--protocol", "v1", "--epochs", 2, "-k", 3, "--json")
    assert r.exit_code == 0, r.output
    cfg = dataclasses.asdict(pdiff.open_run(run).config)  # as recorded, every preset spelled out
    per_epoch = pdiff.batches(pdiff.CollectConfig(), pdiff.load_data("digits", validation=0.2), "snapshot")[1]
    assert (cfg["protocol"], cfg["optimizer"], cfg["nesterov"], cfg["lr"], cfg["schedule"], cfg["epochs"]) == \
        ("v1", "sgd", False, 0.1, "multistep", 2)  # --epochs overrides the preset's 30
    assert (cfg["snapshot_optimizer"], cfg["snapshot_every"], cfg["k"]) == ("continue", per_epoch, 3)
    snaps = read(run / "snapshots.safetensors")["snapshots"]
    assert snaps.shape[0] == 3 and (snaps[0] - snaps[2]).abs().max() > 1e-4
    for gamma in (0.0, 1.0):  # after the milestone the lr is 0.1 * gamma, and stage 2 goes on with it
        cfg = pdiff.CollectConfig.of("v1", milestones="1", gamma=gamma, epochs=2, k=3)
        net = torch.nn.Linear(2, 2)
        opt = pdiff.optimizer(cfg.optimizer, net.parameters(), cfg.lr, cfg.weight_decay, cfg.nesterov)
        sched = pdiff.schedule(cfg, opt, 2 * 5, 5)
        for _ in range(7):
            opt.step(), sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * gamma) and not opt.param_groups[0]["nesterov"]
    r = cli("collect", "--run", tmp_path / "x", "--protocol", "v1", "--networks", 3)  # each network its own optimizer
    assert r.exit_code == 2 and "--protocol v1" in r.stderr and "no --networks" in r.stderr


def test_protocol_presets_are_the_defaults_options_override():
    v3 = pdiff.CollectConfig.of("v3", lr=0.01)
    assert (v3.pretrained, v3.optimizer, v3.lr, v3.batch_size, v3.k, v3.snapshot_lr, v3.snapshot_norm) == \
        (True, "adamw", 0.01, 128, 300, 0.03, "v3")
    full = pdiff.CollectConfig.of("v3-full").resolved()
    assert (full.image_size, full.params, full.epochs, full.snapshot_lr) == (64, "all", 50, 1e-3)
    assert pdiff.CollectConfig.of() == pdiff.CollectConfig()  # pdiff's own: the dataclass defaults
    r = cli("collect", "--run", "x", "--protocol", "v2")
    assert r.exit_code == 2 and "v3-full" in r.output


def test_pack_unpack_optimizer_state():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    t = {}
    skel = json.loads(json.dumps(pdiff.pack(opt.state_dict(), t, "opt")))
    back = pdiff.unpack(skel, t)
    opt2 = torch.optim.AdamW(net.parameters(), lr=0.1)
    opt2.load_state_dict(back)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_two_sample_statistic_hand_checked():
    from scipy import stats
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0, 7.0])
    effect, p = pdiff.two_sample(a, b, len(b))
    assert effect == -1.0  # every a below every b
    z = (0 - 6) / math.sqrt(3 * 4 * 8 / 12)  # U = 0, its mean n_a n_b / 2 = 6 and variance n_a n_b (n + 1) / 12
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert p == pytest.approx(stats.mannwhitneyu(a, b, method="asymptotic", use_continuity=False).pvalue)
    assert pdiff.two_sample(b, b, 4) == (0.0, 1.0)
    assert pdiff.two_sample(a, b, 2)[1] > p  # 4 values counted as 2 draws (k snapshots of a network): less evidence
    effect, p = pdiff.two_sample(torch.tensor([10.0]), b, 4)  # one model: t prediction interval from b
    t = (10 - 5.5) / (b.std().item() * math.sqrt(1 + 1 / 4))
    assert effect == 1.0 and p == pytest.approx(2 * stats.t.sf(t, 3))


def _numbers(n, nearest_ratio=0.5, max_iou=0.8, to_mean=50.0, acc=95.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    jitter = lambda v, s: v + s * torch.randn(n, generator=g, dtype=torch.float64)
    return {"nearest_ratio": jitter(nearest_ratio, 0.05), "max_iou": jitter(max_iou, 0.02),
            "to_mean": jitter(to_mean, 3.0), "accuracy": jitter(acc, 0.5)}


def test_judge_gives_each_label_by_its_rule():
    held = _numbers(20, seed=1)
    label = lambda **k: pdiff.judge(_numbers(40, **k), held, 20)
    assert label()["label"] == "fresh"
    assert label(nearest_ratio=0.1)["label"] == "copying"  # close to a particular original
    assert label(max_iou=0.95)["label"] == "copying"  # its mistakes are an original's
    assert label(to_mean=20.0)["label"] == "averaging"
    assert label(acc=90.0)["label"] == "inferior"
    assert label(nearest_ratio=0.1, to_mean=20.0, acc=90.0)["label"] == "averaging"  # the first rule that applies
    assert label(nearest_ratio=0.1, acc=90.0)["label"] == "copying"
    far = label(nearest_ratio=0.9, to_mean=80.0)  # farther than held-out originals: shown, still fresh
    assert far["label"] == "fresh" and far["tests"]["to_mean"]["shift"] == "higher"
    t = label(to_mean=20.0)["tests"]["to_mean"]
    assert t["median"] == pytest.approx(20.0, abs=2) and t["held_out"] == pytest.approx(50.0, abs=3) and t["p"] < 0.05


def test_judge_corrects_for_several_metrics():
    # one metric at p ~ 0.03 alone: significant by itself, not after Holm over the four
    held = {k: torch.arange(10, dtype=torch.float64) for k in pdiff.TESTS}
    group = {k: torch.arange(10, dtype=torch.float64) for k in pdiff.TESTS}
    group["to_mean"] = torch.arange(10, dtype=torch.float64) - 3.2
    raw = pdiff.two_sample(group["to_mean"], held["to_mean"], 10)[1]
    r = pdiff.judge(group, held, 10)
    family = len(pdiff.TESTS) + len(pdiff.ZONES)  # the location tests and the zone tests, one Holm family
    assert 0.0125 < raw < 0.05 and r["tests"]["to_mean"]["p"] == pytest.approx(min(1, family * raw), rel=1e-2)
    assert r["label"] == "fresh"


def test_zone_test_is_exact_under_exchangeability():
    """Brute force: with the n + m values in every order equally likely, how often do k or more of the group's n
    lie below the held-out units' lowest (m < 30: j = 1)? That is the p the zone test gives."""
    import itertools
    n, m = 3, 4
    j = pdiff.edge_rank(m)
    orders = list(itertools.permutations(range(n + m)))  # ranks of the n group values, then the m held-out ones
    for k in range(n + 1):
        hits = sum(sum(r[i] < sorted(r[n:])[j - 1] for i in range(n)) >= k for r in orders)
        a = torch.tensor([-1.0] * k + [10.0] * (n - k))  # k of them below every held-out value
        z = pdiff.zone_test(a, n, torch.arange(m, dtype=torch.float64), -1)
        assert z["count"] == k and z["p"] == pytest.approx(hits / len(orders), abs=1e-12)
    assert z["held_out"] == pytest.approx(j / (m + 1), abs=1e-4)


def test_copies_mixed_with_far_off_sets_read_copying():
    """The issue's mixture: half exact copies (nearest 0, IoU 1), half far-off draws. A location test per metric
    sees no shift (half below, half above); the per-model zones and the exact copies do."""
    held = _numbers(20, seed=1)
    mix = _numbers(50, seed=2)
    mix["nearest_ratio"][:26], mix["max_iou"][:26] = 0.0, 1.0
    mix["nearest_ratio"][26:], mix["max_iou"][26:] = 0.99, 0.6
    r = pdiff.judge(mix, held, 20)
    assert r["tests"]["nearest_ratio"]["shift"] == "same" and r["tests"]["max_iou"]["shift"] == "same"
    assert r["zones"]["nearest_ratio"]["count"] == 26 and r["zones"]["nearest_ratio"]["p"] < 0.05
    assert r["label"] == "copying"
    assert pdiff.judge(_numbers(1, seed=3), held, 20, copies=1)["label"] == "copying"  # one exact copy, judged alone
    wide = _numbers(10, seed=6)
    wide["to_mean"] = torch.linspace(20, 100, 10, dtype=torch.float64)  # one run's snapshots: far and near the mean
    one = _numbers(1, seed=7) | {"to_mean": torch.zeros(1, dtype=torch.float64)}  # the mean itself, judged alone
    assert pdiff.judge(one, wide, 10)["label"] == "averaging"  # on the log scale 0 is infinitely far below 20
    fresh = pdiff.judge(_numbers(50, seed=4), held, 20)
    assert fresh["label"] == "fresh" and fresh["zones"]["to_mean"]["p"] >= 0.05
    failed = pdiff.judge(_numbers(10, seed=5), held, 20, failed=40)  # 40 of 50 failed: they count, as failures
    assert failed["label"] == "inferior" and failed["tests"]["accuracy"]["median"] == 0.0


def test_duplicates_are_originals_within_float_noise():
    g = torch.Generator().manual_seed(0)
    originals = torch.randn(6, 40, generator=g) * 3
    sets = torch.stack([originals[4], originals[1] * (1 + 1e-7), originals[2] + 1e-3, torch.randn(40, generator=g)])
    assert pdiff.duplicates(sets, originals).tolist() == [4, 1, -1, -1]


def test_clustered_models_are_judged_per_unit():
    """A group whose models come in clusters (the held-out originals' half: blocks of two consecutive snapshots) is
    judged one value per unit, as the reference is. Drawn like the reference, it then raises an alarm within the
    tests' 5 %; counted per model, its near-equal pairs pass for independent draws and the alarms pass 5 % (the
    8 % that calibrate_verdict.py measured on held-out halves before)."""
    g = torch.Generator().manual_seed(0)

    def units(n: int) -> dict:  # n units of 2 nearly equal models each
        base = {k: torch.rand(n, generator=g, dtype=torch.float64) for k in pdiff.TESTS}
        return {k: v.repeat_interleave(2) + 1e-4 * torch.rand(2 * n, generator=g, dtype=torch.float64)
                for k, v in base.items()} | {"unit": torch.arange(n).repeat_interleave(2)}

    alarms = {True: 0, False: 0}
    for _ in range(300):
        a, b = units(10), units(10)
        for clustered in alarms:
            group = a if clustered else {k: v for k, v in a.items() if k != "unit"}
            alarms[clustered] += pdiff.judge(group, b, 10)["label"] not in ("fresh", "unknown")
    assert alarms[True] / 300 <= 0.05 < alarms[False] / 300


def test_power_says_what_few_held_out_units_can_see():
    assert pdiff.power(50, 5, 7) == {"detectable_share": 0.68, "low": True}  # 5 held-out units: only majorities
    assert pdiff.power(100, 40, 7)["low"] is False  # 40: a quarter of copies shows
    few, many = pdiff.power(50, 10, 7)["detectable_share"], pdiff.power(50, 20, 7)["detectable_share"]
    assert few > many


def test_median_interval_from_order_statistics():
    from scipy import stats
    v = list(range(100))
    lo, hi = pdiff.median_ci(torch.tensor(v, dtype=torch.float64).tolist())
    assert (lo, hi) == (39.0, 60.0)  # binom(100, 1/2): 2.5 % below 40 order statistics
    assert stats.binom.cdf(39, 100, 0.5) < 0.025 <= stats.binom.cdf(40, 100, 0.5)
    assert pdiff.median_ci([3.0]) == [3.0, 3.0] and pdiff.median_ci([1.0, 5.0, 2.0]) == [1.0, 5.0]


def test_judge_says_unknown_where_no_difference_could_show():
    held = _numbers(5, seed=1)  # 5 held-out networks
    few, more = pdiff.judge(_numbers(4, acc=10.0), held, 5), pdiff.judge(_numbers(8, acc=10.0), held, 5)
    assert few["label"] == "unknown" and few["tests"]["accuracy"]["shift"] == "same"  # 4 against 5: Holm p >= 0.057
    assert more["label"] == "inferior"  # 8 against 5 can show it
    v = pdiff.verdict({**few, "count": 4, "median": 10.0}, {}, 5)
    assert v["label"] == "unknown" and "too few" in v["text"] and "-n" in v["text"]


def test_holdout_keeps_whole_networks_and_blocks_of_one_run_apart():
    steps = pdiff.Collection("snapshots", 1, 200)
    h = pdiff.holdout(steps, 200, 0.1)  # 20 single snapshots, every 10th, a snapshot unused on either side
    assert h.units == [[5 + 10 * j] for j in range(20)]
    assert len(h.training) == 200 - 20 - 40 and not set(h.training) & set(h.held_out)
    assert min(abs(i - t) for i in h.held_out for t in h.training) == 2  # never one step from a training snapshot
    assert pdiff.holdout(steps, 200, 0).units == [] and len(pdiff.holdout(steps, 200, 0).training) == 200
    assert len(pdiff.holdout(steps, 20, 0.1).units) == 5  # at least a handful
    assert pdiff.holdout(steps, 1, 0.1).units == []  # nothing to spare
    assert pdiff.holdout(steps, 6, 5).training == [2]  # a count may leave one to fit (ablate_k.sh's K=1); no gap
    seeds = pdiff.Collection("networks", 10, 3)
    h = pdiff.holdout(seeds, 30, 0.1)  # 5 of 10 networks, all 3 snapshots of each, never the first
    assert h.units == [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 22, 23], [27, 28, 29]]
    assert h.training == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20, 24, 25, 26]
    with pytest.raises(pdiff.PdiffError, match="at least one must remain"):
        pdiff.holdout(seeds, 30, 10)


def test_ruler_numbers_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    train, sets = torch.randn(12, 30, generator=g), torch.randn(5, 30, generator=g) * 2
    correct_t, correct_s = torch.rand(12, 40, generator=g) > 0.3, torch.rand(5, 40, generator=g) > 0.3
    mean, std = train.mean(0), torch.rand(30, generator=g) + 0.5
    ruler = pdiff.Ruler(train, correct_t, mean, std)
    m = ruler.measure(sets, correct_s)
    zt, zs = (train - mean) / std, (sets - mean) / std
    d = torch.cdist(zs.double(), zt.double())
    assert torch.allclose(m["nearest"], d.min(1).values)
    rel = d / (zs.double().norm(dim=1)[:, None] ** 2 + zt.double().norm(dim=1)[None] ** 2).sqrt()
    assert torch.allclose(m["nearest_ratio"], rel.min(1).values)
    assert torch.allclose(m["to_mean"], zs.double().norm(dim=1))
    assert torch.equal(m["max_iou"], pdiff.wrong_iou(correct_s, correct_t).max(1).values.double())
    U, S, _ = torch.linalg.svd(zt.double().T, full_matrices=False)  # the training deviations' span
    Q = U[:, S > 1e-5 * S.max()]  # rank 11: they sum to zero (up to float32 rounding)
    assert Q.shape[1] == 11
    outside = zs.double() - zs.double() @ Q @ Q.T
    assert torch.allclose(m["off_span"], outside.norm(dim=1) / zs.double().norm(dim=1))
    ab, aa, bb = pdiff.products(sets, train, mean, std, chunk=7)  # a few columns at a time: the same
    assert torch.allclose(ab, zs.double() @ zt.double().T) and torch.allclose(aa, zs.double().pow(2).sum(1))
    mt = ruler.measure_training()  # each training original against the others
    dt = torch.cdist(zt.double(), zt.double()).fill_diagonal_(math.inf)
    assert torch.allclose(mt["nearest"], dt.min(1).values)


def test_verdict_sets_a_fresh_group_against_the_curve_and_the_baselines():
    power = {"detectable_share": 0.3, "low": False}
    tests = lambda iou, ratio: {"max_iou": {"median": iou, "shift": "same"},
                                "nearest_ratio": {"median": ratio, "shift": "same"}}
    row = lambda label, median, ci, iou=0.8, ratio=0.5: {"label": label, "median": median, "ci": ci, "count": 50,
                                                        "tests": tests(iou, ratio), "zones": {}, "power": power}
    base = {"noise-0.001": row("copying", 97.0, [96.5, 97.5], 1.0, 0.01),  # the noise curve: accuracy falls as
            "noise-0.15": row("fresh", 95.0, [94.5, 95.5], 0.8, 0.5),  # the models get newer
            "noise-1": row("inferior", 60.0, [55.0, 65.0], 0.2, 1.0),
            "average": row("averaging", 96.0, [95.8, 96.2], 0.85, 0.9), "gaussian": row("fresh", 95.0, [94.8, 95.2])}
    assert pdiff.curve(base)[0]["group"] == "noise-0.001" and len(pdiff.curve(base)) == 3
    assert pdiff.on_curve(pdiff.curve(base), "max_iou", 0.9) == pytest.approx((97.5 + 95.5) / 2)  # halfway
    assert pdiff.on_curve(pdiff.curve(base), "nearest_ratio", 2.0) == 65.0  # past the noisiest level: its value
    v = pdiff.verdict(row("fresh", 96.5, [96.3, 96.7]), base, 20, reference="20 held-out networks")
    assert v["label"] == "novel" and "20 held-out networks" in v["text"]
    v = pdiff.verdict(row("fresh", 96.5, [96.1, 96.7]), base, 20)  # its interval overlaps the average's
    assert v["label"] == "fresh" and "`average`" in v["text"]
    v = pdiff.verdict(row("fresh", 96.5, [96.3, 96.7], iou=0.95), base, 20)  # as close as small noise: not enough
    assert v["label"] == "fresh" and "noise curve" in v["text"]
    assert pdiff.verdict(row("fresh", 99.0, [98.0, 99.5]), {}, 20)["label"] == "fresh"  # no baselines, no bar
    assert pdiff.verdict(row("averaging", 99.0, [98, 99.5]), base, 20)["label"] == "averaging"  # its own label first
    assert pdiff.verdict(row("fresh", 99.0, [98, 99.5]), base, 4)["label"] == "unknown"  # too few held out
    low = pdiff.verdict(row("fresh", 96.5, [96.3, 96.7]) | {"power": {"detectable_share": None, "low": True}}, base,
                        5, reference="5 held-out networks")
    assert "low power" in low["text"]


def test_noise_units():
    layout = pdiff.Layout(["a", "b"], [(2, 2), (3,)])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 6.0]])
    spread = torch.full((7,), 0.5)
    values = pdiff.noise_unit(x, "values", spread, layout)  # each tensor's std of its own values
    assert torch.allclose(values, torch.tensor([[1.2910] * 4 + [3.4641] * 3]), atol=1e-4)
    assert torch.equal(pdiff.noise_unit(x, "spread", spread, layout), spread.expand(1, 7))
    assert torch.equal(pdiff.noise_unit(x, "raw", spread, layout), torch.ones(1, 7))


def test_noise_baseline_with_zero_std_reproduces_originals(digits_run):
    run = pdiff.open_run(digits_run, model="default")
    cfg = pdiff.SampleConfig(n=8, sampler="ddim", ddim_steps=10, noise_std="0")
    rep = pdiff.sample(cfg, run).report
    noise = rep["baselines"]["noise-0"]
    assert noise["nearest_distance"]["median"] == 0.0 and noise["nearest_distance"]["min"] == 0.0
    assert noise["max_iou"]["mean"] == 1.0 and noise["label"] == "copying"
    assert rep["baselines"]["average"]["off_span"] < 1e-3  # averages lie in the originals' span


# ---------------------------------------------------------------------------------------------------- end to end


def test_quick_start_quality_bar(digits_run, sampled):
    rep, _ = sampled
    orig, gen = rep["original"], rep["generated"]
    assert orig["count"] == 140 and rep["held_out"]["count"] == 20  # every 10th held out, 40 unused beside them
    assert gen["count"] == 50 and len(gen["accuracies"]) == 50
    assert orig["median"] > 90.0  # mlp3 really learned digits
    assert gen["median"] >= orig["median"] - 0.5
    assert gen["best"] >= orig["best"] - 1.0
    assert rep["params"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    with safe_open(str(digits_run / "model.safetensors"), "pt") as f:  # fit's report, kept with the model
        meta = f.metadata()
    rt = json.loads(meta["report"])["decoded"]
    assert rt["count"] == 140 and rt["median"] >= orig["median"] - 0.5
    split = json.loads(meta["split"])
    assert split["units"] == pdiff.holdout(pdiff.Collection(), 200, 0.1).units and len(split["training"]) == 140


def test_quick_start_generates_neither_copies_nor_the_mean(digits_run, sampled):
    # a generator that collapses to the snapshots' mean has no spread; one that copies them sits as close to
    # an original as the noise baseline does. The generated sets must be neither.
    rep, out = sampled
    run = pdiff.open_run(digits_run, model="default")
    z_o = run.model.ae.coordinates(run.snapshots[run.training])  # orthonormal coordinates of the span: distances kept
    z_g = run.model.ae.coordinates(read(out / "gen.safetensors")["samples"])
    spread = lambda z: (z - z.mean(0)).norm(dim=1).median().item()  # median distance to the group's own mean
    assert spread(z_g) > 0.25 * spread(z_o), (spread(z_g), spread(z_o))
    d_gen = rep["generated"]["nearest_distance"]["median"]
    assert d_gen > 10 * rep["baselines"]["noise-0.001"]["nearest_distance"]["median"]


def test_sample_json_keys_and_plot(sampled):
    rep, out = sampled
    for key in ("run", "model", "arch", "data", "params", "device", "seed", "original", "held_out", "generated",
                "decoded", "seconds", "baselines", "verdict", "noise_units"):
        assert key in rep
    assert rep["model"] == "default" and rep["noise_units"] == "values"
    noise = {f"noise-{s}" for s in ("0.001", "0.01", "0.05", "0.15", "0.5", "1")}
    assert set(rep["baselines"]) == noise | {"average", "gaussian", "ensemble"}
    assert [p["group"] for p in rep["curve"]] == [f"noise-{s}" for s in ("0.001", "0.01", "0.05", "0.15", "0.5", "1")]
    words = {"copying", "averaging", "inferior", "fresh"}
    for b in [rep["generated"], rep["held_out"], rep["decoded"], *rep["baselines"].values()]:
        assert {"count", "best", "mean", "median", "min", "ci", "max_iou", "nearest_distance", "pairwise_iou",
                "to_mean", "off_span", "label", "tests", "zones", "power"} <= set(b)
        assert b["label"] in words | ({"unknown"} if b is rep["held_out"] else set())  # (its halves: 10 snapshots each)
        assert b["ci"][0] <= b["median"] <= b["ci"][1]
        assert set(b["tests"]) == {"nearest_ratio", "max_iou", "to_mean", "accuracy"} == set(b["zones"]) | {"accuracy"}
        assert all({"median", "held_out", "effect", "p", "shift"} == set(t) for t in b["tests"].values())
        assert all({"share", "held_out", "count", "p"} == set(z) for z in b["zones"].values())
    assert rep["held_out"]["units"] == 20 and "one run" in rep["held_out"]["reference"]
    assert rep["verdict"]["label"] in words | {"novel"}
    assert set(rep["seconds"]) >= {"generate", "evaluate", "total"}
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000


def test_plot_panels_show_every_group_and_the_trajectories(digits_run):
    import matplotlib.pyplot as plt
    run = pdiff.open_run(digits_run, model="default")
    s = pdiff.sample(pdiff.SampleConfig(n=12, sampler="ddim", ddim_steps=10), run, trace=True, keep=True)
    fig = pdiff.figure(s, run.model, run.snapshots[run.training], run.layout)
    a, b, c, d, e, f, right = fig.axes  # right: panel d's accuracy axis
    legend = lambda ax: [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"original", "held-out", "generated", "average", "gaussian", "ensemble"} <= set(legend(a))
    held = [p for p in a.collections if p.get_label() == "held-out"][0]
    assert len(held.get_offsets()) == len(run.held_out)  # one mark per held-out original
    gen = [p for p in a.collections if p.get_label() == "generated"][0]
    assert sorted(gen.get_offsets()[:, 1].tolist()) == pytest.approx(sorted(s.accuracies.tolist()))
    assert {"original", "held-out", "generated"} <= set(legend(c))  # latents
    assert len(d.get_lines()) == pdiff.TRACED and len(s.trajectory) == 11  # 10 steps and the end, 8 paths
    tr = s.report["trajectory"]  # accuracy and similarity along the reverse process, noise first
    assert [p["t"] for p in tr] == [t for t, _ in s.trajectory] and tr[-1]["t"] == -1
    for i in (0, -1):  # from x_T to the end: the traced samples, decoded as they stand
        acc = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, run.model.decode(s.trajectory[i][1]),
                                            run.data.x_test, run.data.y_test))
        assert tr[i]["accuracy"] == pytest.approx(acc.median().item(), abs=1e-3)
    assert right.get_lines()[0].get_ydata().tolist() == [p["accuracy"] for p in tr]
    shown = e.get_images()[0].get_array(), f.get_images()[0].get_array()  # Fig. 3: originals and generated
    assert shown[0].shape == (10, 400) and shown[1].shape == (10, 400) and 0 <= shown[0].min() and shown[1].max() <= 1
    t0 = (torch.linspace(0, run.layout.D - 1, 400).long() < run.layout.sizes[0]).numpy()  # columns of tensor 0
    assert 100 < t0.sum() < 400  # every tensor gets columns
    assert min(shown[0][:, t0].min(), shown[1][:, t0].min()) == 0 and max(shown[0][:, t0].max(), shown[1][:, t0].max()) == 1
    plt.close(fig)


def test_baselines_ensemble_and_noise_levels(digits_run, sampled):
    rep, _ = sampled
    run = pdiff.open_run(digits_run, model="default")
    ens = rep["baselines"]["ensemble"]  # the weight average of the training originals, evaluated as one model
    mean = run.snapshots[run.training].mean(0, keepdim=True)
    acc = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, mean, run.data.x_test, run.data.y_test))
    assert ens["count"] == 1 and ens["best"] == pytest.approx(acc.item(), abs=1e-3) and ens["off_span"] == 0.0
    assert ens["to_mean"] == 0.0 and ens["label"] == "averaging"
    d = [rep["baselines"][f"noise-{s}"]["nearest_distance"]["median"] for s in ("0.001", "0.05", "0.15")]
    assert d[0] < d[1] < d[2]
    cfg = pdiff.SampleConfig(n=20, sampler="ddim", ddim_steps=10, noise_std="0.15", noise_units="spread")
    d = pdiff.sample(cfg, run).report["baselines"]["noise-0.15"]["nearest_distance"]["median"]
    assert d == pytest.approx(0.15 * rep["params"]**0.5, rel=0.1)  # std s in D standardised coordinates: s sqrt(D)


def test_export_loads_strictly_into_the_collected_network(digits_run, tmp_path):
    out = tmp_path / "best.safetensors"
    r = cli("sample", "--run", digits_run, "-n", 8, "--sampler", "ddim", "--export", out, "--json",
            "--save", tmp_path / "sets.safetensors")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    net, _, _ = pdiff.build_net("mlp3", 1, 8, 10)
    net.load_state_dict(read(out), strict=True)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    inp = json.loads(meta["input"])  # how to prepare images, as the file says: used here with plain torch
    assert (inp["channels"], inp["size"]) == (1, 8) and "mean" in inp["preprocessing"]
    d = pdiff.load_data("digits")
    mean, std = (torch.tensor(inp[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    x = (d.x_test.float() / 255 - mean) / std
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == d.y_test).float().mean().item() * 100
    i = json.loads(meta["index"])
    assert acc == pytest.approx(rep["generated"]["accuracies"][i], abs=1e-3)  # its test accuracy, as reported
    assert "validation" in json.loads(meta["picked"]) and json.loads(meta["accuracy"]) == pytest.approx(acc, abs=1e-3)
    run = pdiff.open_run(digits_run)  # picked on the validation split: the most accurate of the 8 there
    val = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, read(tmp_path / "sets.safetensors")["samples"],
                                        run.data.x_val, run.data.y_val))
    assert i == int(val.argmax()) and json.loads(meta["validation_accuracy"]) == pytest.approx(val.max().item(), abs=1e-3)


def test_named_models_beside_the_default(digits_run, tmp_path):
    run = tmp_path / "named"
    shutil.copytree(digits_run, run)
    default = read(run / "model.safetensors")
    r = cli("fit", "--run", run, "--name", "tiny", "--ae-steps", 20, "--denoiser-steps", 20, "--latent", 16, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "tiny" and (run / "model-tiny.safetensors").exists()
    assert all(torch.equal(v, read(run / "model.safetensors")[k]) for k, v in default.items())  # untouched
    r = cli("sample", "--run", run, "--model", "tiny", "-n", 4, "--sampler", "ddim", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model"] == "tiny"
    r = cli("sample", "--run", run, "--model", "nope", "-n", 4)
    assert r.exit_code == 1 and "--name nope" in r.stderr
    r = cli("fit", "--run", run, "--name", "../x")
    assert r.exit_code == 2 and "should use only letters" in r.stderr


def test_snapshot_and_generated_files_load_into_fresh_model(digits_run, sampled):
    rep, out = sampled
    net_t = read(digits_run / "network.safetensors")
    snaps = read(digits_run / "snapshots.safetensors")["snapshots"]
    gen = read(out / "gen.safetensors")
    assert snaps.shape == (200, rep["params"])  # training, held-out and the unused snapshots beside them
    assert gen["samples"].shape == (50, rep["params"])
    assert torch.allclose(gen["accuracies"], torch.tensor(rep["generated"]["accuracies"]), atol=1e-3)
    net, _, _ = pdiff.build_net("mlp3", 1, 8, 10)
    net.load_state_dict(net_t)
    layout = pdiff.select_params(net, "all")
    d = pdiff.load_data("digits", validation=0.2)  # the images as collect split and normalised them
    prep = pdiff.Prep(d.mean, d.std, 1, 8)
    for vec, acc in ((snaps[7], None), (gen["samples"][3], gen["accuracies"][3])):
        fresh, _, _ = pdiff.build_net("mlp3", 1, 8, 10)
        missing, unexpected = fresh.load_state_dict(pdiff.Layout.unflatten(layout, vec), strict=False)
        assert missing == [] and unexpected == []
        fresh.eval()
        with torch.no_grad():
            a = (fresh(prep(d.x_test)).argmax(1) == d.y_test).float().mean().item() * 100
        if acc is not None:
            assert a == pytest.approx(acc.item(), abs=1e-3)


def test_same_seed_same_json(tmp_path):
    reports = []
    for name in ("a", "b"):
        run = tmp_path / name
        assert cli("collect", "--run", run, "--epochs", 3, "-k", 20).exit_code == 0
        assert cli("fit", "--run", run, "--ae-steps", 40, "--denoiser-steps", 40).exit_code == 0
        r = cli("sample", "--run", run, "-n", 10, "--json", "--sampler", "ddim")
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)
        rep.pop("seconds"), rep.pop("run")
        reports.append(rep)
    assert reports[0] == reports[1]


def judge_file(path: Path, sets: torch.Tensor) -> Path:
    from safetensors.torch import save_file
    save_file({"sets": sets.contiguous()}, str(path))
    return path


def calibration(run: Path, rep: dict, tmp_path: Path, held_out: str = "fresh"):
    """The verdict's calibration cases on one run: copies, blends and fresh draws get the label that is true."""
    assert rep["held_out"]["label"] == held_out  # one half of the held-out originals against the other half
    assert rep["baselines"]["noise-0.001"]["label"] == "copying"  # each a training original plus the smallest noise
    assert rep["baselines"]["average"]["label"] == "averaging"  # means of 16 training originals
    r = pdiff.open_run(run, model="default")
    x = r.snapshots[r.training]
    judged = lambda sets: json.loads(cli("sample", "--run", run, "--judge", judge_file(tmp_path / "j.safetensors", sets),
                                         "-n", 20, "--json").stdout)
    got = judged(x)  # the training originals themselves
    assert got["judged"]["label"] == "copying" and got["verdict"]["label"] == "copying"
    assert got["judged"]["count"] == len(x) and got["judged"]["nearest_distance"]["median"] == 0.0
    assert got["judged"]["copies"] == len(x) and got["judged"]["copied"]["training"] == r.training
    best = int(pdiff.accuracy(r.correct[r.training]).argmax())
    got = judged(x[best:best + 1])  # the best training original, judged alone
    assert got["judged"]["label"] == "copying" and "1 of 1 are exact copies" in got["verdict"]["text"]
    got = judged(x[best].expand(50, -1))  # 50 copies of one network
    assert got["verdict"]["label"] == "copying" and got["judged"]["copies"] == 50
    sd = x.std(0)
    mix = torch.cat([x[best].expand(26, -1), x.mean(0) + sd * torch.randn(24, x.shape[1],
                                                                        generator=torch.Generator().manual_seed(1))])
    got = judged(mix)  # 26 copies of the best original and 24 per-coordinate gaussian draws
    assert got["verdict"]["label"] == "copying" and got["judged"]["copies"] == 26
    got = judged(r.snapshots[r.held_out])  # the held-out originals, judged against themselves: named
    assert got["judged"]["label"] == "copying" and got["judged"]["copied"]["held_out"] == r.held_out
    big = x[:40] + 1.0 * r.model.ae.std * torch.randn(40, x.shape[1], generator=torch.Generator().manual_seed(0))
    got = judged(big)  # an original plus noise that leaves the span: never novel
    assert got["judged"]["off_span"] > 0.5 and got["verdict"]["label"] != "novel"


def test_verdict_calibration_on_the_quick_start(digits_run, sampled, tmp_path):
    calibration(digits_run, sampled[0], tmp_path)  # 10 held-out snapshots against the other 10
    r = pdiff.open_run(digits_run, model="default")
    x, g = r.snapshots[r.training], torch.Generator().manual_seed(2)
    mid = torch.stack([x[torch.randperm(len(x), generator=g)[:2]].mean(0) for _ in range(50)])
    got = json.loads(cli("sample", "--run", digits_run, "--judge", judge_file(tmp_path / "m.safetensors", mid), "-n", 20,
                         "--json").stdout)  # midpoints of two random training snapshots: off the run, toward the mean
    assert got["judged"]["label"] == "averaging" and got["judged"]["tests"]["to_mean"]["shift"] == "lower"


def test_verdict_calibration_on_many_seeds_and_permuted_networks(tmp_path):
    run = tmp_path / "seeds"
    assert cli("collect", "--run", run, "--networks", 100, "--epochs", 10).exit_code == 0
    assert cli("fit", "--run", run, "--ae-steps", 200, "--denoiser-steps", 400).exit_code == 0
    r = cli("sample", "--run", run, "-n", 30, "--sampler", "ddim", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["held_out"]["units"] == 10 and rep["original"]["count"] == 90
    # their own test: 5 held-out networks against the other 5, where even two groups wholly apart would not differ at
    # p < 0.05 over the 7 tests (p = 0.009 each): unknown, as judge says of any group that small
    assert pdiff.two_sample(torch.arange(5.0), torch.arange(5.0, 10.0), 5)[1] * 7 > pdiff.ALPHA
    calibration(run, rep, tmp_path, "unknown")
    # permutation-aware: a held-out network with its hidden units shuffled is aligned back before it is measured
    o = pdiff.open_run(run, model="default")
    net = o.snapshots[o.held_out[0]]
    p = o.layout.unflatten(net)
    spec = pdiff.symmetry(o.net, o.prep.shape)
    shuffled = o.layout.pack(pdiff.permuted(p, spec, [torch.randperm(u.n) for u in spec]))
    assert (shuffled - net).abs().max() > 0.1
    both = json.loads(cli("sample", "--run", run, "--judge", judge_file(tmp_path / "p.safetensors",
                                                                         torch.stack([net, shuffled])), "--json").stdout)
    d = both["judged"]["nearest_distance"]
    assert d["min"] == pytest.approx(d["median"], rel=1e-4)  # the same network, wherever its units sit


def test_judge_reads_state_dicts_sample_files_and_refuses_the_rest(digits_run, sampled, tmp_path):
    rep, out = sampled
    best = tmp_path / "best.safetensors"
    r = cli("sample", "--run", digits_run, "-n", 8, "--sampler", "ddim", "--export", best, "--json")
    with safe_open(str(best), "pt") as f:
        exported = json.loads(f.metadata()["accuracy"])
    got = json.loads(cli("sample", "--run", digits_run, "--judge", best, "--json").stdout)  # a whole state dict
    assert got["judged"]["count"] == 1 and got["judged"]["best"] == pytest.approx(exported, abs=1e-3)
    assert got["sampler"] is None and got["judge"] == str(best)
    got = json.loads(cli("sample", "--run", digits_run, "--judge", out / "gen.safetensors", "--json").stdout)
    assert got["judged"]["accuracies"] == rep["generated"]["accuracies"]  # a --save file: the same 50 sets
    stacked = tmp_path / "stacked.safetensors"
    run = pdiff.open_run(digits_run)
    from safetensors.torch import save_file
    save_file({n: t.contiguous() for n, t in run.layout.unflatten(run.snapshots[:3]).items()}, str(stacked))
    got = json.loads(cli("sample", "--run", digits_run, "--judge", stacked, "--json").stdout)
    assert got["judged"]["count"] == 3 and got["judged"]["label"] == "copying"  # n stacked networks
    wrong = judge_file(tmp_path / "wrong.safetensors", torch.zeros(3, 10))
    for f in (wrong, tmp_path / "missing.safetensors"):
        r = cli("sample", "--run", digits_run, "--judge", f)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--judge" in r.stderr


def test_without_held_out_originals_the_verdict_is_unknown(tmp_path):
    run = tmp_path / "k30"
    assert cli("collect", "--run", run, "--epochs", 5, "-k", 30).exit_code == 0
    assert cli("fit", "--run", run, "--ae-steps", 50, "--denoiser-steps", 50, "--holdout", 0).exit_code == 0
    r = cli("sample", "--run", run, "-n", 10, "--json", "--sampler", "ddim")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["verdict"]["label"] == "unknown" and rep["held_out"] is None and rep["original"]["count"] == 30
    assert "label" not in rep["generated"]


def write_idx(path: Path, array: torch.Tensor):
    """torchvision's MNIST on-disk format (IDX): magic 0x0000 08 ndim, big-endian dims, uint8 data."""
    path.write_bytes(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.to(torch.uint8).numpy().tobytes())


def write_mnist(root: Path):
    """A tiny learnable MNIST in torchvision's files: class c is a bright bar at row 2c, plus noise."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("t10k", 32)):
        y = torch.arange(n) % 10
        x = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i in range(n):
            x[i, 2 * y[i]:2 * y[i] + 3, 4:24] = 255
        x = (x.int() + torch.randint(0, 40, x.shape, generator=g)).clamp(max=255)
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)


def test_mnist_from_torchvision_files(tmp_path):
    write_mnist(tmp_path / "data")
    d = pdiff.load_data("mnist", str(tmp_path / "data"))
    assert d.x_train.shape == (96, 1, 28, 28) and d.x_test.shape == (32, 1, 28, 28) and d.classes == 10
    run = tmp_path / "run"
    r = cli("collect", "--run", run, "--data", "mnist", "--data-dir", tmp_path / "data", "--epochs", 10,
            "--batch-size", 32, "-k", 5, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["snapshots"]["count"] == 5 and rep["snapshots"]["median"] > 50.0  # well above chance (10%)
    assert read(run / "snapshots.safetensors")["snapshots"].shape == (5, 784 * 32 + 32 + 32 * 32 + 32 + 330)



def stub_mnist_download(monkeypatch, calls: list, fail: Exception = None):
    """torchvision's MNIST downloader replaced by a test double: for each file it would fetch, it writes what the
    real archive extracts to (IDX files, write_mnist's data), or raises `fail` as an offline machine would."""
    import torchvision.datasets.mnist

    def fake(url, download_root, filename, md5):
        calls.append(filename)
        if fail is not None:
            raise fail
        if not (Path(download_root) / "train-images-idx3-ubyte").exists():
            write_mnist(Path(download_root).parent.parent)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fake)


def test_collect_downloads_a_missing_data_set_by_default(tmp_path, monkeypatch):
    calls = []
    stub_mnist_download(monkeypatch, calls)
    r = cli("collect", "--run", tmp_path / "run", "--data", "mnist", "--data-dir", tmp_path / "data", "--epochs", 1,
            "--batch-size", 32, "-k", 2, "--json")
    assert r.exit_code == 0, r.output
    said = " ".join(r.stderr.split())  # rich wraps at the terminal's width
    assert len(calls) == 4 and "downloading it (about 12 MB" in said  # the 4 files of MNIST, the size said first
    assert (tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert json.loads(r.stdout)["snapshots"]["count"] == 2
    r = cli("collect", "--run", tmp_path / "run2", "--data", "mnist", "--data-dir", tmp_path / "data", "--epochs", 1,
            "--batch-size", 32, "-k", 2, "--no-download")  # now on disk: read, nothing fetched
    assert r.exit_code == 0 and len(calls) == 4, r.output


def test_no_download_and_offline_refusals_say_what_to_do(tmp_path, monkeypatch):
    import urllib.error

    calls = []
    stub_mnist_download(monkeypatch, calls, fail=urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    args = ["collect", "--run", tmp_path / "run", "--data", "mnist", "--data-dir", tmp_path / "data"]
    r = cli(*args, "--no-download")
    assert r.exit_code == 1 and calls == [] and "fetches it (unless --no-download)" in r.stderr, r.output
    r = cli(*args)  # offline: torchvision tries its mirrors, then gives up
    lines = [line for line in r.stderr.splitlines() if line.startswith("pdiff: error:")]
    assert r.exit_code == 1 and len(calls) == 2 and "Traceback" not in r.output, r.output  # both mirrors tried
    assert len(lines) == 1 and "could not download mnist" in lines[0] and "--data digits" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written


def write_paper_data_set(name: str, root: Path) -> tuple:
    """SVHN, Flowers-102, Oxford-IIIT Pet or Food-101 in the files torchvision reads: 6 train + 3 test images of 3
    classes, image i a flat colour (its class c, its index i) so each can be recognised after loading. Returns the
    (train, test) labels written and the colour of an image: colour(c, i) -> (r, g, b)."""
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    colour = lambda c, i: (40 + 80 * c, 10 * i, 200)  # noqa: E731
    labels = {"train": [0, 1, 2, 0, 1, 2], "test": [2, 0, 1]}
    jpg = lambda path, c, i, wh=(40, 30): Image.new("RGB", wh, colour(c, i)).save(path, quality=100)  # noqa: E731
    if name == "svhn":  # one .mat per split: X (32, 32, 3, N) uint8, y (N, 1) with the digit 0 stored as 10
        root.mkdir(parents=True)
        for split, y in labels.items():
            x = np.stack([np.broadcast_to(np.array(colour(c, i), np.uint8), (32, 32, 3)) for i, c in enumerate(y)], -1)
            savemat(root / f"{split}_32x32.mat", {"X": x, "y": np.array([[c or 10] for c in y], np.uint8)})
    elif name == "flowers102":  # jpg/image_00001.jpg ..., imagelabels.mat (1-based), setid.mat (image ids per split)
        (root / "flowers-102" / "jpg").mkdir(parents=True)
        ys = labels["train"] + labels["test"]
        for k, c in enumerate(ys):
            jpg(root / "flowers-102" / "jpg" / f"image_{k + 1:05d}.jpg", c, k % 6)
        savemat(root / "flowers-102" / "imagelabels.mat", {"labels": np.array([c + 1 for c in ys])})
        savemat(root / "flowers-102" / "setid.mat", {"trnid": np.arange(1, 7), "tstid": np.arange(7, 10),
                                                       "valid": np.arange(7, 10)})
    elif name == "pets":  # images/<Breed_name>_<n>.jpg, annotations/{trainval,test}.txt: "id class species breed"
        base = root / "oxford-iiit-pet"
        (base / "images").mkdir(parents=True), (base / "annotations").mkdir()
        for split, y in labels.items():
            lines = []
            for i, c in enumerate(y):
                image_id = f"{['Abyssinian', 'beagle', 'Bengal'][c]}_{split}{i}"
                jpg(base / "images" / f"{image_id}.jpg", c, i)
                lines.append(f"{image_id} {c + 1} 1 1")
            split_file = "trainval" if split == "train" else "test"
            (base / "annotations" / f"{split_file}.txt").write_text("\n".join(lines) + "\n")
    else:  # food101: images/<class>/<id>.jpg, meta/{train,test}.json {class: ["class/id", ...]}
        base = root / "food-101"
        (base / "meta").mkdir(parents=True)
        names = ["apple_pie", "bibimbap", "churros"]
        for split, y in labels.items():
            meta = {n: [] for n in names}
            for i, c in enumerate(y):
                (base / "images" / names[c]).mkdir(parents=True, exist_ok=True)
                jpg(base / "images" / names[c] / f"{split}{i}.jpg", c, i)
                meta[names[c]].append(f"{names[c]}/{split}{i}")
            (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
            # torchvision lists a split class by class: the order the labels come back in
            labels[split] = sorted(y)
    return labels["train"], labels["test"], colour


@pytest.mark.parametrize("name", ["svhn", "flowers102", "pets", "food101"])
def test_paper_data_sets_from_torchvision_files(tmp_path, monkeypatch, name):
    """The paper's other data sets read through torchvision's own classes from files in their formats. SVHN and
    Flowers-102 check their .mat files' md5 against the real downloads, which these files cannot match: only that
    check is replaced (by "the file exists"), in this process."""
    import torchvision.datasets.flowers102
    import torchvision.datasets.svhn

    for module in (torchvision.datasets.svhn, torchvision.datasets.flowers102):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    y_train, y_test, colour = write_paper_data_set(name, tmp_path / "data")
    d = pdiff.load_data(name, str(tmp_path / "data"), image_size=16)
    assert d.x_train.shape == (6, 3, 16, 16) and d.x_test.shape == (3, 3, 16, 16) and d.x_train.dtype == torch.uint8
    assert d.y_train.tolist() == y_train and d.y_test.tolist() == y_test
    assert d.classes == {"svhn": 10, "flowers102": 102}.get(name, 3) and d.augment == (name != "svhn")
    if name == "svhn":  # the first train image, class 0 (stored as 10), index 0, exactly
        assert d.x_train[0, :, 5, 5].tolist() == list(colour(0, 0))
    else:  # the first image of class 1 in the train split, up to JPEG's rounding
        i = y_train.index(1)
        assert (d.x_train[i, :, 8, 8].int() - torch.tensor(colour(1, i if name != "food101" else 1))).abs().max() <= 4
    r = cli("collect", "--run", tmp_path / "run", "--data", name, "--data-dir", tmp_path / "data", "--image-size", 16,
            "--epochs", 2, "--batch-size", 6, "-k", 2, "--json")  # and through collect, into a network's head
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["snapshots"]["count"] == 2
    assert read(tmp_path / "run" / "network.safetensors")["5.weight"].shape[0] == d.classes


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,code,words", [
    (["collect", "--arch", "nope"], 2, "unknown --arch 'nope'"), (["collect", "--data", "nope"], 2, "unknown --data"),
    (["collect", "--device", "nope"], 2, "unknown --device"), (["collect", "-k", "0"], 2, "'-k'"),
    (["sample", "-n", "0"], 2, "'-n'"), (["sample", "--sampler", "euler"], 2, "'euler' is not one of"),
    (["collect", "--params", "zzz*"], 2, "'zzz*' matches no parameter"), (["collect", "--data", "mnist", "--no-download"], 1, "--no-download"),
    (["fit"], 1, "pdiff collect --run"), (["sample"], 1, "pdiff collect --run"),
    (["sample", "--plot", "out.pdf"], 2, "should end in .png"), (["sample", "-n", "abc"], 2, "valid integer"),
    (["sample", "--bogus"], 2, "No such option: --bogus"), (["collect", "--lr"], 2, "'--lr'"),
    (["fit", "--generator", "span+unet"], 2, "unknown --generator 'span+unet'"),
    (["collect", "--lr", "-1"], 2, "greater than or equal to 0"),
    (["collect", "--networks", 2, "--init", "x.safetensors"], 2, "--init would start them all alike"),
    (["collect", "--data", "imagefolder"], 1, "does not exist"),
    (["collect", "--arch", "convnet3", "--params", "norm"], 2, "found no normalisation layer"),
])
def test_errors_are_one_line(tmp_path, args, code, words):
    run = tmp_path / "empty-run"
    r = cli(*args, "--run", run, "--data-dir", tmp_path / "nodata") if args[0] == "collect" else cli(*args, "--run", run)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pdiff: error:"), r.stderr
    assert words in lines[0], lines[0]
    assert not run.exists()  # nothing written on failure


def test_the_installed_pdiff_command(tmp_path):
    """`pip install -e .` (the README's set-up) installs the `pdiff` console script beside this Python: it runs
    this checkout's pdiff.py, help for every command, one-line errors."""
    exe = shutil.which("pdiff", path=str(Path(sys.executable).parent))
    assert exe, f"no `pdiff` command beside {sys.executable}: run the README's `pip install -e .`"
    for sub in ([], ["collect"], ["fit"], ["sample"]):
        r = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, timeout=120)
        direct = subprocess.run([sys.executable, str(HERE / "pdiff.py"), *sub, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(" ".join(["Usage: pdiff", *sub, "[OPTIONS]"])), r.stderr
        assert r.stdout == direct.stdout.replace("Usage: pdiff.py", "Usage: pdiff", 1)  # the same code
    r = subprocess.run([exe, "sample", "-n", "0", "--run", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("pdiff: error:") and len(r.stderr.splitlines()) == 1


def test_version_and_what_a_run_folder_holds(digits_run, tmp_path):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith(f"pdiff {pdiff.__version__} ")
    info = json.loads(cli("info", digits_run, "--json").stdout)
    assert info["network"]["config"]["arch"] == "mlp3" and info["snapshots"]["collection"]["per_network"] == 200
    m = info["models"]["default"]
    assert m["generator"] == "span" and m["training"] == 140 and m["held_out"] == [1] * 20
    assert m["settings"]["latent"] == 16 and m["settings"]["ae_steps"] == 400  # resolved: defaults and what was typed
    r = cli("info", digits_run)
    assert r.exit_code == 0 and "model default: span, fitted to 140 originals" in " ".join(r.stderr.split())
    r = cli("info", tmp_path / "nothing")
    assert r.exit_code == 1 and r.stderr.startswith("pdiff: error:") and r.stderr.count("\n") == 1


def test_run_that_is_a_file_and_outputs_that_are_folders(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for cmd in ("collect", "fit", "sample"):
        r = cli(cmd, "--run", f)
        assert r.exit_code == 2 and "is a file" in r.stderr and "Traceback" not in r.output
    r = cli("sample", "--run", tmp_path / "none", "--save", tmp_path)
    assert r.exit_code == 2 and "is a folder" in r.stderr
    assert f.read_text() == "x"


def test_sample_never_writes_over_the_runs_own_files(digits_run, tmp_path):
    before = folder_state(digits_run)
    for option, name in (("--save", "snapshots.safetensors"), ("--export", "network.safetensors"),
                         ("--save", "model.safetensors")):
        r = cli("sample", "--run", digits_run, "-n", 2, option, digits_run / name)
        assert r.exit_code == 2 and "run's own files" in r.stderr, r.output
    store = tmp_path / "store"  # a run whose file is a link to elsewhere: the link is what would be replaced
    shutil.copytree(digits_run, store)
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in store.iterdir():
        (linked / f.name).symlink_to(f)
    for name in ("snapshots.safetensors", "Model.safetensors"):  # a case-insensitive file system is one file
        r = cli("sample", "--run", linked, "-n", 2, "--save", linked / name)
        assert r.exit_code == 2 and "run's own files" in r.stderr, r.output
    r = cli("sample", "--run", digits_run, "-n", 2, "--save", tmp_path / "a.safetensors", "--export",
            tmp_path / "a.safetensors")
    assert r.exit_code == 2 and "same file" in r.stderr
    assert folder_state(digits_run) == before and not (tmp_path / "a.safetensors").exists()


def test_sample_before_fit_and_existing_run(tmp_path):
    run = tmp_path / "r"
    assert cli("collect", "--run", run, "--epochs", 1, "-k", 3).exit_code == 0
    before = folder_state(run)
    r = cli("sample", "--run", run)
    assert r.exit_code == 1 and "pdiff fit" in r.stderr
    r = cli("collect", "--run", run)
    assert r.exit_code == 1 and "--force" in r.stderr
    assert folder_state(run) == before


def test_bad_files_are_refused_and_nothing_changes(digits_run, tmp_path):
    # a truncated model file
    run = tmp_path / "trunc"
    shutil.copytree(digits_run, run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = folder_state(run)
    r = cli("sample", "--run", run, "-n", 2)
    assert r.exit_code == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.output
    assert folder_state(run) == before
    # a file with the wrong format string: the network file put where the snapshots belong
    run = tmp_path / "format"
    shutil.copytree(digits_run, run)
    shutil.copy(run / "network.safetensors", run / "snapshots.safetensors")
    before = folder_state(run)
    r = cli("fit", "--run", run)
    assert r.exit_code == 1 and "not a pdiff snapshots file" in r.stderr
    assert folder_state(run) == before
    # a model from another run (different seed): names both files
    other = tmp_path / "other"
    assert cli("collect", "--run", other, "--epochs", 1, "-k", 3, "--seed", 1).exit_code == 0
    assert cli("fit", "--run", other, "--ae-steps", 5, "--denoiser-steps", 5).exit_code == 0
    run = tmp_path / "mixed"
    shutil.copytree(digits_run, run)
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    before = folder_state(run)
    r = cli("sample", "--run", run, "-n", 2)
    assert r.exit_code == 1 and "model.safetensors" in r.stderr and "snapshots" in r.stderr
    assert folder_state(run) == before
    # a write that fails (safetensors' own error type): one line, exit 1
    r = cli("sample", "--run", digits_run, "-n", 2, "--sampler", "ddim", "--save", "/proc/pdiff-test.safetensors")
    assert r.exit_code == 1 and "could not write" in r.stderr and "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------------- resume


def run_until(args, watch: Path | None = None, sig=signal.SIGKILL, after: Path | None = None, until=None):
    """Start pdiff in a subprocess; send `sig` as soon as `watch` exists (and `after`, if given), or `until()`."""
    until = until or (lambda: watch.exists() and (after is None or after.exists()))
    p = subprocess.Popen([sys.executable, str(HERE / "pdiff.py"), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if until():
            p.send_signal(sig)
            break
        time.sleep(0.005)
    out, errs = p.communicate(timeout=120)
    return p.returncode, errs


@pytest.mark.parametrize("stage", [1, 2, "seeds", "seeds-2"])
def test_collect_killed_and_resumed_equals_uninterrupted(tmp_path, stage):
    args = {1: ["--epochs", 40, "-k", 300, "--checkpoint-every", 50],
            2: ["--epochs", 2, "-k", 400, "--checkpoint-every", 20],
            "seeds": ["--networks", 30, "--epochs", 40, "-k", 20, "--checkpoint-every", 50],
            "seeds-2": ["--networks", 30, "--epochs", 2, "-k", 300, "--checkpoint-every", 50]}[stage]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli("collect", "--run", ref, *args).exit_code == 0
    ck = run / "collect-checkpoint.safetensors"
    phase = {1: "train network", 2: "snapshots", "seeds": "seeds 0-29: train", "seeds-2": "seeds 0-29: snapshots"}[stage]
    code, _ = run_until(["collect", "--run", run, *args], until=lambda: checkpoint_phase(ck) == phase)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert ck.exists() and not (run / "snapshots.safetensors").exists() and not (run / "network.safetensors").exists()
    r = cli("collect", "--run", run, "--resume")
    assert r.exit_code == 0, r.output
    assert not ck.exists()
    for f in ("network.safetensors", "snapshots.safetensors"):
        a, b = read(ref / f), read(run / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_phase(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])["phase"]
    except Exception:  # not there yet, or being replaced
        return None


@pytest.mark.parametrize("phase", ["autoencoder", "diffusion"])
def test_fit_killed_and_resumed_equals_uninterrupted(digits_run, tmp_path, phase):
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        d.mkdir()
        for f in ("network.safetensors", "snapshots.safetensors"):
            shutil.copy(digits_run / f, d / f)
    args = ["--ae-steps", 150, "--denoiser-steps", 300, "--checkpoint-every", 25]
    assert cli("fit", "--run", ref, *args).exit_code == 0
    ck = run / "fit-checkpoint.safetensors"
    code, _ = run_until(["fit", "--run", run, *args], until=lambda: checkpoint_phase(ck) == phase)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "model.safetensors").exists()
    r = cli("fit", "--run", run, "--resume")
    assert r.exit_code == 0, r.output
    a, b = read(ref / "model.safetensors"), read(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    ck = run / "collect-checkpoint.safetensors"
    code, errs = run_until(["collect", "--run", run, "--epochs", 60, "--checkpoint-every", 100], ck, sig=signal.SIGINT)
    assert code == 130, errs
    assert "--resume" in errs and "Traceback" not in errs
    assert ck.exists()
    for cmd in ("fit", "sample"):  # the next stages point at the command that finishes collect
        r = cli(cmd, "--run", run)
        assert r.exit_code == 1 and f"pdiff collect --resume --run {run}" in r.stderr
    r = cli("collect", "--run", run, "--resume", "-k", 5)  # contradicts the checkpoint: refused, nothing changes
    assert r.exit_code == 2 and "-k" in r.stderr and "contradicts" in r.stderr and len(r.stderr.splitlines()) == 1
    assert cli("collect", "--run", run, "--resume", "-k", 200, "--checkpoint-every", 7).exit_code == 0  # agree
    assert read(run / "snapshots.safetensors")["snapshots"].shape[0] == 200


def test_resume_on_a_finished_stage_says_so_and_exits_0(tmp_path):
    run = tmp_path / "r"
    first = cli("collect", "--run", run, "--epochs", 1, "-k", 4, "--json")
    assert first.exit_code == 0
    for _ in range(2):  # a script retrying --resume until it succeeds
        r = cli("collect", "--run", run, "--resume", "--json")
        assert r.exit_code == 0 and "already finished" in r.stderr
        assert re.search(r"snapshots +4 +[\d.]+ +[\d.]+", r.stderr), r.stderr  # its table again: the row of 4
        assert json.loads(r.stdout) == json.loads(first.stdout)
    r = cli("collect", "--run", run, "--resume", "-k", 10)  # not what the finished run was made with
    assert r.exit_code == 2 and "-k 10 contradicts the finished" in r.stderr
    fitted = cli("fit", "--run", run, "--ae-steps", 5, "--denoiser-steps", 5, "--json")
    r = cli("fit", "--run", run, "--resume", "--json")
    assert r.exit_code == 0 and "already finished" in r.stderr and json.loads(r.stdout) == json.loads(fitted.stdout)
    r = cli("fit", "--run", run, "--resume", "--latent", 8)
    assert r.exit_code == 2 and "--latent 8 contradicts the finished" in r.stderr
    r = cli("fit", "--run", run)
    assert r.exit_code == 1 and "--force" in r.stderr and "--resume" not in r.stderr  # finished: nothing to resume
    r = cli("fit", "--run", tmp_path / "never", "--resume")
    assert r.exit_code == 1 and "does not exist" in r.stderr  # nothing ever ran there: still an error


def test_fit_replaces_a_model_only_with_force(tmp_path):
    run = tmp_path / "r"
    assert cli("collect", "--run", run, "--epochs", 1, "-k", 4).exit_code == 0
    assert cli("fit", "--run", run, "--ae-steps", 5, "--denoiser-steps", 5).exit_code == 0
    before = folder_state(run)
    r = cli("fit", "--run", run, "--ae-steps", 6, "--denoiser-steps", 5)
    assert r.exit_code == 1 and "--force" in r.stderr and folder_state(run) == before
    r = cli("fit", "--run", run, "--latent", 5000, "--force")  # more than D = 3,466: refused before anything goes
    assert r.exit_code == 2 and "more than the 3466 parameters" in r.stderr and folder_state(run) == before
    small = tmp_path / "small"  # D = 10 < the default --latent 16: a fit with --latent 4 resumes without it
    assert cli("collect", "--run", small, "--epochs", 1, "-k", 5, "--params", "5.bias").exit_code == 0
    assert cli("fit", "--run", small, "--latent", 4, "--ae-steps", 5, "--denoiser-steps", 5).exit_code == 0
    assert cli("fit", "--run", small, "--resume").exit_code == 0
    assert cli("fit", "--run", run, "--ae-steps", 6, "--denoiser-steps", 5, "--force").exit_code == 0
    assert folder_state(run)["model.safetensors"] != before["model.safetensors"]
    assert "--force" in cli("fit", "--help").stdout
    r = cli("collect", "--run", run, "--epochs", 1, "-k", 3, "--force")  # a new collection: the old model goes
    assert r.exit_code == 0 and not (run / "model.safetensors").exists()


@pytest.mark.parametrize("stage", ["collect", "seeds", "fit"])
def test_signal_during_the_final_evaluation_exits_130_and_resumes(tmp_path, monkeypatch, stage):
    """SIGINT arriving while collect evaluates its snapshots or fit its round trip: checkpoint, exit 130."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    collect = ["--epochs", 2, "-k", 20] if stage != "seeds" else ["--epochs", 2, "--networks", 6]
    fit = ["--ae-steps", 20, "--denoiser-steps", 20, "--name", "abl"]
    stage, model = ("collect" if stage == "seeds" else stage), "model-abl"
    assert cli("collect", "--run", ref, *collect).exit_code == 0
    if stage == "fit":
        shutil.copytree(ref, run)
        assert cli("fit", "--run", ref, *fit).exit_code == 0
    evaluate = pdiff.evaluate

    def interrupted_evaluate(*a, **kw):
        pdiff.STOP["signum"] = signal.SIGINT  # as if Ctrl-C came now
        return evaluate(*a, **kw)

    monkeypatch.setattr(pdiff, "evaluate", interrupted_evaluate)
    r = cli(stage, "--run", run, *(collect if stage == "collect" else fit))
    hint = f"pdiff {stage} --resume --run {run}" + (" --name abl" if stage == "fit" else "")
    assert r.exit_code == 130 and hint in r.stderr
    assert (run / f"{stage}-checkpoint{'-abl' if stage == 'fit' else ''}.safetensors").exists()
    assert not (run / f"{'snapshots' if stage == 'collect' else model}.safetensors").exists()
    monkeypatch.setattr(pdiff, "evaluate", evaluate)
    assert cli(*hint.split()[1:]).exit_code == 0
    for f in (["network", "snapshots"] if stage == "collect" else [model]):
        a, b = read(ref / f"{f}.safetensors"), read(run / f"{f}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_sets_keep_their_place_in_json_and_file(digits_run, tmp_path, monkeypatch):
    draw = pdiff.LatentDiffusion.draw

    def with_a_failure(self, n, g, **kw):
        sets = draw(self, n, g, **kw)
        sets[2, 5] = float("nan")
        return sets

    monkeypatch.setattr(pdiff.LatentDiffusion, "draw", with_a_failure)
    out = tmp_path / "gen.safetensors"
    r = cli("sample", "--run", digits_run, "-n", 6, "--sampler", "ddim", "--save", out, "--json")
    assert r.exit_code == 0, r.output
    gen = json.loads(r.stdout)["generated"]
    saved = read(out)
    assert gen["count"] == 5 and gen["failed"] == 1 and len(gen["accuracies"]) == 6 and gen["accuracies"][2] is None
    assert saved["samples"].shape[0] == 6 and saved["accuracies"][2].isnan()
    for i in (0, 1, 3, 4, 5):
        assert saved["accuracies"][i].item() == pytest.approx(gen["accuracies"][i], abs=1e-3)


def test_damaged_file_is_refused_by_its_hash(digits_run, tmp_path):
    run = tmp_path / "flip"
    shutil.copytree(digits_run, run)
    path = run / "snapshots.safetensors"
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 1000] ^= 0x01  # one bit of one snapshot; the size stays the same
    path.write_bytes(bytes(data))
    r = cli("sample", "--run", run, "-n", 2, "--sampler", "ddim")
    assert r.exit_code == 1 and "snapshots.safetensors is damaged" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_artifacts_get_the_mode_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("collect", "--run", tmp_path / "r", "--epochs", 1, "-k", 2).exit_code == 0
    finally:
        os.umask(old)
    for f in ("network.safetensors", "snapshots.safetensors"):
        assert (tmp_path / "r" / f).stat().st_mode & 0o777 == 0o644


def test_data_found_from_any_folder_and_overridable(tmp_path, monkeypatch):
    write_mnist(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert cli("collect", "--run", "run", "--data", "mnist", "--data-dir", "data", "--epochs", 2,
               "--batch-size", 32, "-k", 4).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # collect's relative --data-dir was recorded as an absolute path
    assert cli("fit", "--run", tmp_path / "run", "--ae-steps", 5, "--denoiser-steps", 5).exit_code == 0
    shutil.move(tmp_path / "data", tmp_path / "moved")
    r = cli("sample", "--run", tmp_path / "run", "-n", 2, "--sampler", "ddim")
    assert r.exit_code == 1 and "--data-dir" in r.stderr
    r = cli("sample", "--run", tmp_path / "run", "-n", 2, "--sampler", "ddim", "--data-dir", tmp_path / "moved")
    assert r.exit_code == 0, r.output


def test_steps_are_limited_by_the_models_T():
    steps = lambda T, **kw: pdiff.sampler_steps(pdiff.SampleConfig(**kw), T)
    assert steps(1000) == 1000 and steps(1000, sampler="ddim") == 50 and steps(20, sampler="ddim") == 20
    assert steps(1000, sampler="ddim", ddim_steps=1001) == 1000 and steps(None, sampler="ddim") is None
    with pytest.raises(pdiff.PdiffError, match="eta applies to the ddim sampler"):
        steps(None, eta=1.0)


def test_off_span_leaves_each_original_out():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=g, dtype=torch.float64)

    def brute(i, pts):  # share of pts[i]'s deviation from the others' mean outside the span of their deviations
        others = torch.cat([pts[:i], pts[i + 1:]])
        dev, d = others - others.mean(0), pts[i] - others.mean(0)
        proj = dev.T @ torch.linalg.pinv(dev.T) @ d
        return ((d - proj).norm() / d.norm()).item()

    loo = lambda pts: pdiff.off_span_loo((pts - pts.mean(0)) @ (pts - pts.mean(0)).T)  # from the Gram matrix
    got = loo(z)
    assert got.tolist() == pytest.approx([brute(i, z) for i in range(6)], abs=1e-5)
    assert 0 < got.min() and got.max() < 1
    z7 = torch.cat([z, ((z[0] + z[1]) / 2)[None]])  # a midpoint: it, and both ends, lie in the others' hull
    got = loo(z7)
    assert got[[0, 1, 6]].tolist() == pytest.approx([0, 0, 0], abs=1e-6)
    assert got[2:6].tolist() == pytest.approx([brute(i, z7) for i in range(2, 6)], abs=1e-5)
    ruler = pdiff.Ruler(z.float(), torch.ones(6, 3, dtype=torch.bool), z.float().mean(0), torch.ones(10))
    mix = ruler.measure(z[:3].float().mean(0, keepdim=True), torch.ones(1, 3, dtype=torch.bool))
    assert mix["off_span"].item() < 1e-3  # a mix of originals: inside
    assert torch.allclose(ruler.measure_training()["off_span"], loo(z), atol=1e-4)


def test_ema_is_bias_corrected_and_its_decay_acts_from_the_first_step():
    net = torch.nn.Linear(1, 1, bias=False)
    avg = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=pdiff.ema(0.9))
    values = [5.0, 1.0, 3.0]
    for v in values:
        net.weight.data.fill_(v)
        avg.update_parameters(net)
    w = [0.1 * 0.9 ** (len(values) - 1 - i) for i in range(len(values))]  # (1 - d) d^(n - i)
    assert avg.module.weight.item() == pytest.approx(sum(wi * v for wi, v in zip(w, values)) / sum(w), rel=1e-6)
    # (the old warm-up, decay (1 + n) / (10 + n) capped at 0.9, gave the last step 0.75 of the average here, not 0.37)


def test_experiment_script_prints_a_table(tmp_path):
    """experiments/ablate_noise.sh at QUICK=1: one collection, four named models, a Markdown row each."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PDIFF": f"{sys.executable} {HERE / 'pdiff.py'}"}
    p = subprocess.run(["bash", str(HERE / "experiments" / "ablate_noise.sh")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("| noise augmentation |") and len(lines) == 6
    for line, name in zip(lines[2:], ("none", "input only", "latent only", "both (default)")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name and cells[6] in ("copying", "averaging", "inferior", "fresh", "novel", "unknown")
        best, mean, median = map(float, cells[1].split(" / "))
        assert 0 < median <= best <= 100 and 0 < float(cells[3]) <= 100 and 0 < float(cells[4]) <= 100
        assert all(0 < float(v) <= 1 for v in cells[5].split(" / "))  # max IoU: generated / originals
    fits = sorted(f.name for f in tmp_path.joinpath("noise").glob("model-*.safetensors"))
    assert fits == ["model-both.safetensors", "model-input.safetensors", "model-latent.safetensors",
                    "model-none.safetensors"]


@pytest.mark.parametrize("script,rows", [("table1.sh", ["digits / mlp3"]),
                                         ("ablate_generator.sh", ["span", "v3"]),
                                         ("target_accuracy.sh", ["none", "median", "best"])])
def test_generator_and_table1_scripts(tmp_path, script, rows):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PDIFF": f"{sys.executable} {HERE / 'pdiff.py'}",
           "GENERATORS": "span v3"}
    p = subprocess.run(["bash", str(HERE / "experiments" / script)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()[2:]
    got = [line.split("|")[1].strip().split(" (")[0] for line in lines]
    if script == "target_accuracy.sh":  # the targets: the originals' median and best validation accuracy
        val = read(tmp_path / "run" / "snapshots.safetensors")["val_correct"].float().mean(1) * 100
        rows = ["none", f"{statistics.median(val.tolist()):.2f}", f"{val.max().item():.2f}"]
    assert got == rows
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] in ("copying", "averaging", "inferior", "fresh", "novel", "unknown")
        assert 0 < float(cells[1].split(" / ")[2]) <= 100  # generated median


def test_results_are_rebuilt_from_the_scripts_output(tmp_path):
    """experiments/results.py quickstart (QUICK=1): the quick start's script runs, its output is kept with where it
    came from, and RESULTS.md and the README's marked block are rebuilt from it; other parts keep theirs."""
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "whole_model.md").write_text("| kept | 1 |\n")
    readme.write_text("# x\n<!-- results: quickstart -->\nold\n<!-- /results -->\nend\n")
    env = {**os.environ, "QUICK": "1", "PDIFF": f"{sys.executable} {HERE / 'pdiff.py'}"}
    p = subprocess.run([sys.executable, str(HERE / "experiments" / "results.py"), "quickstart", "--docs", str(docs),
                        "--readme", str(readme)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr
    part = (docs / "results" / "quickstart.md").read_text()
    assert part.startswith("Made by `bash experiments/quickstart.sh` (QUICK=1) at commit ")
    table = [ln for ln in part.splitlines() if ln.startswith(" generated ")]
    assert len(table) == 1 and 0 < float(table[0].split()[3]) <= 100  # the generated median, as sample printed it
    assert "verdict: " in part and "collect " in part.splitlines()[-1]  # and the wall times
    text = readme.read_text()
    assert "old" not in text and part in text and text.endswith("<!-- /results -->\nend\n")
    results = (docs / "RESULTS.md").read_text()
    assert "## The quick start" in results and "| kept | 1 |" in results and part.strip() in results
    bad = subprocess.run([sys.executable, str(HERE / "experiments" / "results.py"), "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown parts ['nope']" in bad.stderr


def test_experiment_script_stops_on_a_failed_pdiff(tmp_path):
    """A pdiff command that fails stops the script with its error line, not a table row of zeros."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PDIFF": f"{sys.executable} {HERE / 'pdiff.py'} --bogus"}
    p = subprocess.run(["bash", str(HERE / "experiments" / "ablate_k.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 1 and len(p.stdout.splitlines()) == 2  # the table's header, no row
    assert "experiment stopped: pdiff collect failed: pdiff: error: No such option: --bogus" in p.stderr


def test_seeds_trained_together_equal_each_trained_alone(tmp_path):
    assert cli("collect", "--run", tmp_path / "four", "--networks", 4, "--epochs", 5, "--no-align").exit_code == 0
    assert cli("collect", "--run", tmp_path / "one", "--networks", 1, "--seed", 2, "--epochs", 5).exit_code == 0
    four, one = (read(tmp_path / r / "snapshots.safetensors")["snapshots"] for r in ("four", "one"))
    assert four.shape == (4, 3466) and torch.equal(four[2], one[0])  # bit for bit
    assert not torch.equal(four[0], four[1])  # and the seeds really differ
    r = cli("collect", "--run", tmp_path / "k", "--networks", 3, "--epochs", 5, "-k", 4, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["snapshots"]["count"] == 12  # K = N x k
    with safe_open(str(tmp_path / "k" / "snapshots.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["collection"]) == {"kind": "networks", "networks": 3, "per_network": 4,
                                                          "aligned": True, "match": "weights", "reference": "first",
                                                          "reference_rows": [3], "recalibrated": 0}


def test_merge_many_and_the_mean_reference(tmp_path):
    """MergeMany of shuffled copies of one network is that network (permuted as a whole); collect --reference mean
    makes its consensus of the networks fit's default --holdout keeps, records them, and fit refuses a --holdout that
    would hold one out (the memorisation test would then judge networks that shaped the alignment)."""
    torch.manual_seed(0)
    net = pdiff.build_net("convnet3", 1, 8, 10, width=8)[0]
    layout, spec = pdiff.select_params(net, "all"), pdiff.symmetry(net, (1, 8, 8))
    v = layout.flatten(net)
    copies = torch.stack([layout.pack(pdiff.permuted(layout.unflatten(v), spec, [torch.randperm(u.n) for u in spec]))
                          for _ in range(4)])
    merged = pdiff.merge_many(copies, layout, spec)
    torch.testing.assert_close(pdiff.align_to(merged[None], v, layout, spec)[0], v, rtol=0, atol=1e-6)
    r = cli("collect", "--run", tmp_path / "r", "--networks", 6, "--epochs", 1, "--reference", "mean", "--json")
    assert r.exit_code == 0, r.stderr
    with safe_open(str(tmp_path / "r" / "snapshots.safetensors"), "pt") as f:
        made = json.loads(f.metadata()["collection"])["reference_rows"]
    held = pdiff.holdout(pdiff.Collection("networks", 6), 6, pdiff.FitConfig().holdout).held_out
    assert made == [0, 2, 4] and held == [1, 3, 5]
    r = cli("fit", "--run", tmp_path / "r", "--holdout", 2)  # networks 2 and 4
    assert r.exit_code == 2 and "would hold out networks that made this collection's alignment reference" in r.stderr


EXAMPLES = {"lenet5": (f"{HERE / 'examples' / 'lenet5.py'}:make", 1, 28),
            "resnet_bn": (f"{HERE / 'examples' / 'resnet_bn.py'}:tiny", 1, 8)}  # 8 / 16 channels: seconds


def random_statistics(net: torch.nn.Module, g: torch.Generator):
    """BatchNorm weights, biases and running statistics away from their initial values, so that a permutation
    that forgets one of them changes the outputs."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=g), m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g), m.bias.data.normal_(0, 0.1, generator=g)


def check_symmetry(net: torch.nn.Module, shape: tuple, x: torch.Tensor, other: torch.nn.Module = None):
    """For the symmetry spec of net: a random permutation of every group (parameters and running statistics) leaves
    its outputs as they were, and the permuted copy aligns back to it bit for bit. With `other`: aligned to net, it
    computes what it computed before and has moved towards net (weight matching's objective)."""
    spec, layout = pdiff.symmetry(net, shape), pdiff.select_params(net, "all")
    ref = dict(net.eval().state_dict())
    out = lambda p, module=net: torch.func.functional_call(module, p, (x,))
    g = torch.Generator().manual_seed(1)
    shuffled = pdiff.permuted(ref, spec, [torch.randperm(u.n, generator=g) for u in spec])
    v, v_shuffled = layout.pack(ref), layout.pack(shuffled)
    assert (v_shuffled - v).abs().max() > 0.01  # it moved
    with torch.no_grad():
        torch.testing.assert_close(out(shuffled), out(ref), rtol=1e-4, atol=1e-5)
        assert torch.equal(pdiff.align_to(v_shuffled[None], v, layout, spec)[0], v)  # aligned back exactly
    if other is not None:
        theirs = dict(other.eval().state_dict())
        v_other = layout.pack(theirs)
        aligned = pdiff.align_to(v_other[None], v, layout, spec)[0]
        perms = pdiff.match_units(layout.unflatten(v), layout.unflatten(v_other), spec, pdiff.rng(0, "align"))
        p = pdiff.permuted(theirs, spec, perms)  # the running statistics move with their units too
        assert torch.equal(layout.pack(p), aligned)
        with torch.no_grad():
            torch.testing.assert_close(out(p, other), out(theirs, other), rtol=1e-4, atol=1e-5)
        assert (aligned - v).norm() < (v_other - v).norm() and aligned @ v > v_other @ v
    return spec


@pytest.mark.parametrize("arch", ["mlp3", "convnet3", "lenet5", "resnet_bn"])
def test_alignment_of_small_networks(arch):
    arch, channels, size = EXAMPLES.get(arch, (arch, 1, 8))
    torch.manual_seed(0)
    nets = [pdiff.build_net(arch, channels, size, 10, width=8)[0] for _ in range(3)]
    for net in nets:
        random_statistics(net, torch.Generator().manual_seed(len(str(net))))
    check_symmetry(nets[0], (channels, size, size), torch.randn(16, channels, size, size), nets[1])
    layout, spec = pdiff.select_params(nets[0], "all"), pdiff.symmetry(nets[0], (channels, size, size))
    vecs = torch.stack([layout.flatten(n) for n in nets])
    aligned = pdiff.align(vecs, layout, spec, 1, vecs[0])  # the collection's alignment: each as align_to would
    assert torch.equal(aligned[0], vecs[0]) and torch.equal(aligned[1:], pdiff.align_to(vecs[1:], vecs[0], layout, spec))
    assert torch.equal(pdiff.align(torch.stack([vecs[0], aligned[2]]), layout, spec, 1, vecs[0])[1], aligned[2])
    prep = pdiff.Prep([0.5] * channels, [0.25] * channels, channels, size)  # activation matching, on random images
    by = pdiff.ByActivations(nets[0], prep, spec, torch.randint(0, 256, (2, 16, channels, size, size), dtype=torch.uint8))
    shuffled = layout.pack(pdiff.permuted(layout.unflatten(vecs[0]), spec, [torch.randperm(u.n) for u in spec]))
    assert torch.equal(pdiff.align_to(torch.stack([shuffled, vecs[1]]), vecs[0], layout, spec, match=by)[0], vecs[0])


def narrow_head(net: torch.nn.Module, width: int = 256):
    """alexnet's and vgg's 4096-wide classifiers made `width` wide, their convolutions as they are: weight matching
    of two 4096 x 25088 layers takes about 20 s on 2 cores (experiments/align_exact.py runs them whole)."""
    i, j, k = [i for i, m in enumerate(net.classifier) if isinstance(m, torch.nn.Linear)]
    net.classifier[i] = torch.nn.Linear(net.classifier[i].in_features, width)
    net.classifier[j], net.classifier[k] = torch.nn.Linear(width, width), torch.nn.Linear(width, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "mnasnet0_5", "vgg11_bn", "alexnet"])  # wide_resnet50_2: resnet50's graph, wider
def test_alignment_of_torchvision_networks(arch):
    """Every torchvision network the symmetry spec accepts, at random initialisation and 32 px. (Weight matching of
    two different random networks takes minutes on the larger ones: the small networks' test does that.)"""
    torch.manual_seed(0)
    net, ch, size = pdiff.build_net(arch, 3, 32, 10)
    if arch in ("vgg11_bn", "alexnet"):
        narrow_head(net)
    random_statistics(net, torch.Generator().manual_seed(0))
    assert len(check_symmetry(net, (ch, size, size), torch.randn(2, ch, size, size))) > 1


@pytest.mark.parametrize("args,words", [(["--arch", "squeezenet1_1", "--networks", 2], "node 'cat' (cat) concatenates"),
                                        (["--networks", 2, "--params", "norm"], "needs --params all"),
                                        (["--align"], "needs --networks"),
                                        (["--arch", "regnet_x_400mf", "--networks", 2, "--align"],
                                         "is a grouped (groups=2) convolution; --no-align trains without alignment")])
def test_seeds_and_align_refuse_what_cannot_work(tmp_path, args, words):
    r = cli("collect", "--run", tmp_path / "r", *args, "--epochs", 0)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    assert words in r.stderr, r.stderr


def test_recalibrated_evaluation_batched_equals_loop_and_torch():
    """BatchNorm statistics recomputed per parameter set: the batched path, the loop, and torch's own BatchNorm
    (reset, momentum None: a cumulative average, train mode over the batches) agree example for example."""
    d = pdiff.load_data("digits")
    torch.manual_seed(0)
    net = pdiff.build_net(EXAMPLES["resnet_bn"][0], 1, 8, 10)[0]
    prep, layout = pdiff.Prep(d.mean, d.std, 1, 8), pdiff.select_params(net, "all")
    sets = layout.flatten(net) + 0.05 * torch.randn(5, layout.D, generator=torch.Generator().manual_seed(0))
    sets[3, 0] = float("nan")
    xs = pdiff.calibration_batches(d, 3, 64, 0)
    assert xs.shape == (3, 64, 1, 8, 8) and torch.equal(xs, pdiff.calibration_batches(d, 3, 64, 0))
    assert pdiff.calibration_batches(d, 30, 64, 0).shape == (30, 64, 1, 8, 8)  # more than the training set: cycles
    x, y = d.x_test[:200], d.y_test[:200]
    assert pdiff.eval_path(net, prep, layout, x, xs) == "batched"
    fast = pdiff.evaluate(net, prep, layout, sets, x, y, batch=64, memory=1 << 20, calibrate=xs)  # several chunks
    slow = pdiff.evaluate(net, prep, layout, sets, x, y, batch=64, path="loop", calibrate=xs)
    assert torch.equal(fast, slow) and not fast[3].any()
    for vec, row in zip(sets[[0, 1, 2, 4]], fast[[0, 1, 2, 4]]):
        m = copy.deepcopy(net)
        layout.load(m, vec)
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.reset_running_stats()
                bn.momentum = None
        with torch.no_grad():
            m.train()
            for xb in xs:
                m(prep(xb))
            assert torch.equal(m.eval()(prep(x)).argmax(-1) == y, row)
    assert not torch.equal(fast, pdiff.evaluate(net, prep, layout, sets, x, y))  # the statistics matter
    assert [m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [0.1] * 6  # restored


def test_batchnorm_networks_trained_together_as_alone():
    """--networks with BatchNorm: running statistics stacked beside the parameters, so each network's parameters and
    statistics are those it gets alone (to vmap's arithmetic: a grouped convolution of 3 rounds unlike one of 1)."""
    cfg = pdiff.CollectConfig(arch=EXAMPLES["resnet_bn"][0], networks=3, epochs=1).resolved()
    d = pdiff.load_data("digits")

    def train(seeds):
        nets = [pdiff.collect_network(pdiff.dataclasses.replace(cfg, seed=s), d, torch.device("cpu"), weights=True)[0]
                for s in seeds]
        _, prep, layout, _ = pdiff.collect_network(cfg, d, torch.device("cpu"), weights=True)
        rows = torch.zeros(len(seeds), 1, layout.D)
        return rows, pdiff.train_stacked(cfg, d, seeds, nets, prep, layout, pdiff.Loop(), rows)
    (three, b3), (one, b1) = train([0, 1, 2]), train([2])
    torch.testing.assert_close(three[2], one[0], rtol=0, atol=1e-3)  # measured: 2.4e-4 after 22 steps
    assert (three[0] - three[2]).abs().max() > 0.1  # and the seeds differ
    for k in b1:
        if "running" in k:
            torch.testing.assert_close(b3[k][2], b1[k][0], rtol=0, atol=1e-3)
            assert not torch.equal(b1[k][0], torch.zeros_like(b1[k][0]) if "mean" in k else torch.ones_like(b1[k][0]))


LABELS = ("copying", "averaging", "inferior", "fresh", "novel", "unknown")


@pytest.mark.parametrize("arch", ["lenet5", "resnet_bn"])
def test_seeds_of_lenet5_and_a_batchnorm_resnet_end_to_end(tmp_path, arch, monkeypatch):
    """LeNet-5 (digits resized to 28 px) and a ResNet with BatchNorm from the examples: collect --networks aligned by
    the spec read from their graphs, fit, sample with the verdict's labels; a held-out network brought shuffled is
    the same network to the verdict (the ResNet's units matched by their activations, the default with BatchNorm)."""
    path, _, size = EXAMPLES[arch]
    run = tmp_path / arch
    monkeypatch.setitem(pdiff.PROTOCOLS, "pdiff", {"recalibrate": 5})  # a Python API field: 5 batches, not 20
    r = cli("collect", "--run", run, "--arch", path, "--image-size", size, "--networks", 10, "--epochs", 8, "--lr", 0.02,
            "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["snapshots"]["count"] == 10 and rep["snapshots"]["median"] > 90
    assert ("recalibrated" in rep) == (arch == "resnet_bn")
    with safe_open(str(run / "snapshots.safetensors"), "pt") as f:  # the default matching: activations with BatchNorm
        assert json.loads(f.metadata()["collection"])["match"] == ("activations" if arch == "resnet_bn" else "weights")
    assert cli("fit", "--run", run, "--ae-steps", 30, "--denoiser-steps", 30).exit_code == 0
    r = cli("sample", "--run", run, "-n", 6, "--sampler", "ddim", "--json", "--export",
            tmp_path / "best.safetensors")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["held_out"]["units"] == 5 and rep["generated"]["label"] in LABELS
    o = pdiff.open_run(run)  # the exported network, loaded with plain torch, scores what the report says
    o.net.load_state_dict(read(tmp_path / "best.safetensors"), strict=True)
    with torch.no_grad():
        acc = (o.net.eval()(o.prep(o.data.x_test)).argmax(1) == o.data.y_test).float().mean().item() * 100
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as f:
        i = json.loads(f.metadata()["index"])
    assert acc == pytest.approx(rep["generated"]["accuracies"][i], abs=1e-3)  # running statistics included
    assert all(g["label"] in LABELS for g in rep["baselines"].values())
    assert rep.get("recalibrated", {}).get("batches") == (5 if arch == "resnet_bn" else None)
    o = pdiff.open_run(run)
    spec, x = pdiff.symmetry(o.net, o.prep.shape), o.snapshots[o.training]
    g = torch.Generator().manual_seed(0)  # the 5 training networks with their units shuffled: unaligned as trained
    mixed = torch.stack([o.layout.pack(pdiff.permuted(o.layout.unflatten(v), spec, [torch.randperm(u.n, generator=g)
                                                                                    for u in spec])) for v in x])
    unaligned = pdiff.accuracy(pdiff.evaluate(o.net, o.prep, o.layout, mixed.mean(0, keepdim=True), o.data.x_test,
                                              o.data.y_test, calibrate=o.calibration)).item()
    assert rep["baselines"]["average"]["median"] > unaligned + 5  # blends work aligned (LeNet 66 %, 24 % shuffled;
    net = o.snapshots[o.held_out[0]]  # the tiny ResNet 26 %, 18 % shuffled)
    shuffled = o.layout.pack(pdiff.permuted(o.layout.unflatten(net), spec, [torch.randperm(u.n) for u in spec]))
    got = json.loads(cli("sample", "--run", run, "--judge", judge_file(tmp_path / "p.safetensors",
                                                                        torch.stack([net, shuffled])), "--json").stdout)
    assert got["judged"]["accuracies"][0] == got["judged"]["accuracies"][1]  # recalibrated alike, too
    assert got["judged"]["copied"] == {"held_out": [o.held_out[0]]} and got["judged"]["copies"] == 2  # aligned as
    assert got["judged"]["label"] == "copying"  # the held-out network was: that network, wherever its units sit


NETS = '''import torch.nn as nn


def mlp(channels, size, classes):  # no normalisation layer
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 16), nn.ReLU(), nn.Linear(16, classes))


class Net(nn.Module):  # a class whose constructor takes other arguments, as most do
    def __init__(self, num_classes=10, hidden=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)).relu())


class Plain(Net):  # a tutorial's Net(): nothing to pass
    def __init__(self):
        super().__init__(10, 8)
'''


def test_a_users_plain_mlp_and_classes_with_their_own_arguments(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    r = cli("collect", "--run", tmp_path / "a", "--arch", f"{tmp_path}/nets.py:mlp", "--epochs", 2, "-k", 5, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["params"] == 64 * 16 + 16 + 16 * 10 + 10  # the default: all, as it has no norm layer
    assert "has no normalisation layer to pick (--params norm): generating all 1,210 parameters" in " ".join(
        r.stderr.split())
    with safe_open(str(tmp_path / "a" / "snapshots.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    assert cfg["params"] == "all" and cfg["snapshot_lr"] == 0.01  # the whole network's stage-2 lr too
    r = cli("collect", "--run", tmp_path / "b", "--arch", f"{tmp_path}/nets.py:mlp", "--params", "norm", "--epochs", 0)
    assert r.exit_code == 2 and "found no normalisation layer" in r.stderr  # asked for: refused
    module = pdiff.USER_MODULES[next(k for k in pdiff.USER_MODULES if k[0] == f"{tmp_path}/nets.py")]
    assert pdiff.user_call(module.Net, 1, 8, 10) == ((), {"num_classes": 10})
    assert pdiff.user_call(module.Plain, 1, 8, 10) == ((), {})
    assert pdiff.user_call(module.mlp, 1, 8, 10) == ((), {"channels": 1, "size": 8, "classes": 10})
    for name, hidden in (("Net", 16), ("Plain", 8)):
        r = cli("collect", "--run", tmp_path / name, "--arch", f"{tmp_path}/nets.py:{name}", "--networks", 3, "--epochs", 2,
                "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["params"] == 64 * hidden + hidden + hidden * 10 + 10
        with safe_open(str(tmp_path / name / "snapshots.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["collection"])["aligned"]


MYNET = '''import torch.nn as nn


def make(channels, size, classes):
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * size * size, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, classes))


def not_a_module(channels, size, classes):
    return "a string"


def raises(channels, size, classes):
    raise ValueError("first line\\nsecond line")


def wrong_input(channels, size, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(10, classes))


def few_classes(channels, size, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 5))


class Branchy(nn.Module):  # control flow on what its parameters computed: vmap cannot batch it
    def __init__(self, classes):
        super().__init__()
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return h if h.sum() > 0 else -h


def branchy(channels, size, classes):
    return Branchy(classes)
'''


def test_network_from_your_own_file_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert pdiff.build_net("mynet.py:make", 1, 8, 10)[0].training  # probed in eval mode, handed back in train mode
    r = cli("collect", "--run", run, "--arch", "mynet.py:make", "--epochs", 2, "-k", 10, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["params"] == 2 * 8 + 2 * 16 and rep["snapshots"]["median"] > 50  # norm: the last two norm layers
    assert cli("fit", "--run", run, "--ae-steps", 20, "--denoiser-steps", 20).exit_code == 0
    monkeypatch.chdir(tmp_path.parent)  # the file's absolute path was recorded
    r = cli("sample", "--run", run, "-n", 4, "--sampler", "ddim", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["generated"]["count"] == 4
    (tmp_path / "mynet.py").write_text(MYNET.replace("nn.Linear(8 * size * size, 16)", "nn.Linear(8 * size * size, 24)")
                                       .replace("LayerNorm(16)", "LayerNorm(24)").replace("Linear(16, classes)",
                                                                                          "Linear(24, classes)"))
    r = cli("sample", "--run", run, "-n", 4)
    assert r.exit_code == 1 and "does not fit" in r.stderr and "size mismatch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "mynet.py").write_text(MYNET.replace("def make(", "def made("))  # the function is gone
    r = cli("sample", "--run", run, "-n", 4)
    assert r.exit_code == 1 and "cannot rebuild the network collect recorded" in r.stderr


@pytest.mark.parametrize("arch,code,words", [("nofile.py:make", 2, "not found"), ("mynet.py:missing", 2, "no function"),
                                             ("mynet.py:not_a_module", 2, "not a torch.nn.Module"),
                                             ("mynet.py:wrong_input", 2, "does not take 1x8x8 images"),
                                             ("mynet.py:raises", 1, "ValueError: first line second line"),
                                             ("mynet.py:few_classes", 2, "returns (2, 5); the data needs (2, 10)")])
def test_your_own_network_errors(tmp_path, monkeypatch, arch, code, words):
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    r = cli("collect", "--run", tmp_path / "r", "--arch", arch, "--epochs", 1, "-k", 2)
    assert r.exit_code == code and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_loop_fallback_for_a_network_vmap_cannot_batch(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(MYNET)
    net = pdiff.build_net(f"{tmp_path}/mynet.py:branchy", 1, 8, 10)[0]
    layout = pdiff.select_params(net, "all")
    prep = pdiff.Prep([0.5], [0.25], 1, 8)
    d = pdiff.load_data("digits")
    sets = layout.flatten(net) + 0.1 * torch.randn(3, layout.D, generator=torch.Generator().manual_seed(0))
    assert pdiff.eval_path(net, prep, layout, d.x_test) == "loop"
    auto = pdiff.evaluate(net, prep, layout, sets, d.x_test, d.y_test)
    with torch.no_grad():  # the network itself, one set at a time
        for vec, row in zip(sets, auto):
            pdiff.Layout.load(layout, net, vec)
            assert torch.equal(row, net(prep(d.x_test)).argmax(1) == d.y_test)
    with pytest.raises(RuntimeError, match="vmap"):  # the batched path really cannot run it
        pdiff.evaluate(net, prep, layout, sets, d.x_test, d.y_test, path="batched")


def test_evaluation_does_not_hide_a_real_error(monkeypatch):
    net, ch, size = pdiff.build_net("mlp3", 1, 8, 10)
    layout = pdiff.select_params(net, "all")
    boom = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug in the fast path"))
    monkeypatch.setattr(pdiff, "run_tail", boom)
    with pytest.raises(RuntimeError, match="a bug"):  # not a quiet fallback to the loop
        pdiff.evaluate(net, pdiff.Prep([0.5], [0.25], 1, 8), layout, layout.flatten(net)[None],
                       torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))


def write_image_folder(root: Path):
    """scikit-learn's digits as PNG files in torchvision's ImageFolder layout, pdiff's own train/test split."""
    from PIL import Image

    d = pdiff.load_data("digits")
    for split, xs, ys in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (root / split / f"class{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0].numpy(), mode="L").save(root / split / f"class{y}" / f"{i:04d}.png")
    return d


def test_image_folder_and_a_torchvision_arch_end_to_end(tmp_path):
    d = write_image_folder(tmp_path / "pngs")
    f = pdiff.load_data("imagefolder", str(tmp_path / "pngs"))
    assert f.x_train.shape == d.x_train.shape and f.classes == 10  # grayscale stays one channel, 8x8 kept
    assert torch.equal(f.x_train.float().mean((0, 2, 3)), d.x_train.float().mean((0, 2, 3)))  # the same pixels
    assert torch.equal(torch.bincount(f.y_test), torch.bincount(d.y_test))
    run = tmp_path / "run"
    r = cli("collect", "--run", run, "--arch", "mobilenet_v3_small", "--data", "imagefolder", "--data-dir",
            tmp_path / "pngs", "--epochs", 1, "-k", 6, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["snapshots"]["count"] == 6
    assert cli("fit", "--run", run, "--ae-steps", 20, "--denoiser-steps", 20).exit_code == 0
    r = cli("sample", "--run", run, "-n", 4, "--sampler", "ddim", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["generated"]["count"] == 4
    (tmp_path / "pngs" / "test").rename(tmp_path / "pngs" / "elsewhere")
    r = cli("collect", "--run", tmp_path / "r2", "--data", "imagefolder", "--data-dir", tmp_path / "pngs")
    assert r.exit_code == 1 and "no test or val/ subfolder" in r.stderr


def torchrun(*args, wait=True):
    """pdiff under torchrun: 2 processes on the CPU (gloo), as the README says to launch it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--",
           str(HERE / "pdiff.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def one_process(*args):
    """pdiff in one process with one thread, as each torchrun worker has: the same rounding."""
    return subprocess.run([sys.executable, str(HERE / "pdiff.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_torchrun_sample_equals_one_process(digits_run):
    two = torchrun("sample", "--run", digits_run, "-n", 12, "--sampler", "ddim", "--json")
    assert two.returncode == 0, two.stderr[-2000:]
    one = one_process("sample", "--run", digits_run, "-n", 12, "--sampler", "ddim", "--json")
    a, b = json.loads(two.stdout), json.loads(one.stdout)  # rank 0 alone prints: one JSON document
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_torchrun_collect_equals_one_process(tmp_path):
    for name, args in (("seeds", ["--networks", 4, "--epochs", 3]), ("one", ["--epochs", 3, "-k", 20])):
        two = torchrun("collect", "--run", tmp_path / f"{name}-2", *args)
        assert two.returncode == 0, two.stderr[-2000:]
        assert one_process("collect", "--run", tmp_path / f"{name}-1", *args).returncode == 0
        a, b = (read(tmp_path / f"{name}-{n}" / "snapshots.safetensors") for n in (2, 1))
        if name == "seeds":  # each process trains its seeds, bit for bit as one process would
            assert torch.equal(a["snapshots"], b["snapshots"])
        else:  # DDP: each process half of every batch, gradients averaged: equal up to the order of additions
            assert (a["snapshots"] - b["snapshots"]).abs().max() < 1e-5 and torch.equal(a["correct"], b["correct"])


def test_torchrun_rank_killed_mid_collect_leaves_it_resumable(tmp_path):
    run, args = tmp_path / "run", ["--epochs", 60, "-k", 50, "--checkpoint-every", 40]
    ck = run / "collect-checkpoint.safetensors"
    p = torchrun("collect", "--run", run, *args, wait=False)
    deadline = time.time() + 300
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victims = [d for d in Path("/proc").iterdir() if d.name.isdigit() and worker_rank(d) == b"1"]
    assert ck.exists() and victims, "no checkpoint or no rank-1 worker to kill"
    os.kill(int(victims[0].name), signal.SIGKILL)
    _, errs = p.communicate(timeout=300)
    assert p.returncode != 0 and any(line.startswith("pdiff: ") for line in errs.splitlines())  # rank 0: one line
    assert not (run / "snapshots.safetensors").exists()
    r = cli("collect", "--run", run, "--resume", "--json")  # one process takes over
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["snapshots"]["count"] == 50 and not ck.exists()


def worker_rank(proc: Path):
    """RANK of a torchrun worker started by this test (None for any other process)."""
    try:
        env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        cmd = (proc / "cmdline").read_bytes()
    except OSError:
        return None
    return env.get(b"RANK") if b"pdiff.py" in cmd and b"TORCHELASTIC_RUN_ID" in env else None


def test_the_autoencoder_works_in_the_span_of_the_training_originals(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=g)  # 7 originals; rows 0-4 train: rank 4 < latent 16
    rows, mean, std = [0, 1, 2, 3, 4], x[:5].mean(0), torch.rand(40, generator=g) + 0.5
    ae = pdiff.SpanAE(40, 5, pdiff.SpanAE.DEFAULTS)
    ae.mean, ae.std = mean, std
    ae.bind(x, rows)
    a = ae.set_span(pdiff.products(x, x, mean, std, rows, rows_a=rows)[0])
    assert a.shape == (5, 16) and not a[:, 4:].any()  # coordinates past the rank are zero
    torch.testing.assert_close(ae.coordinates(x[rows]), a, atol=1e-4, rtol=0)
    m = ae
    torch.testing.assert_close(m.parameters_of(a), x[rows], atol=1e-4, rtol=0)  # back through combine()
    torch.testing.assert_close(m.decode(m.encode(a)), a, atol=1e-4, rtol=0)  # it starts as PCA: exact at this rank
    v = x[5:]  # not training originals: their projection onto the training originals' affine span
    X = (x[rows] - mean) / std
    U, S, _ = torch.linalg.svd(X.double().T, full_matrices=False)
    Q = U[:, S > 1e-5 * S.max()]
    proj = mean + std * (((v - mean) / std).double() @ Q @ Q.T).float()
    torch.testing.assert_close(m.parameters_of(m.coordinates(v)), proj, atol=1e-4, rtol=0)
    run = tmp_path / "r"
    assert cli("collect", "--run", run, "--epochs", 1, "-k", 5).exit_code == 0
    r = cli("fit", "--run", run, "--ae-steps", 1, "--denoiser-steps", 1, "--json")
    assert json.loads(r.stdout)["pca"]["rel_error"] < 1e-3


def test_force_keeps_everything_when_the_new_collect_is_refused(tmp_path):
    run = tmp_path / "r"
    assert cli("collect", "--run", run, "--epochs", 1, "-k", 3).exit_code == 0
    assert cli("fit", "--run", run, "--ae-steps", 2, "--denoiser-steps", 2).exit_code == 0
    before = folder_state(run)
    r = cli("collect", "--run", run, "--force", "--networks", 2, "--arch", "squeezenet1_1", "--epochs", 0)
    assert r.exit_code == 2 and "node 'cat' (cat) concatenates" in r.stderr and folder_state(run) == before


def test_image_folder_of_colour_and_grayscale_non_square_images(tmp_path):
    from PIL import Image

    for split, mode, n in (("train", "L", 6), ("test", "RGB", 4)):
        for i in range(n):
            (tmp_path / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new(mode, (12, 9), color=40 * i if mode == "L" else (40 * i, 0, 0)).save(
                tmp_path / split / f"c{i % 2}" / f"{i}.png")
    d = pdiff.load_data("imagefolder", str(tmp_path))
    assert d.x_train.shape == (6, 3, 64, 64) and d.x_test.shape == (4, 3, 64, 64)  # square, colour, default 64
    assert pdiff.load_data("imagefolder", str(tmp_path), image_size=16).x_test.shape == (4, 3, 16, 16)


def test_paper_stats_standardise_each_tensor_by_its_own_values():
    layout = pdiff.Layout(["w", "b", "v"], [(2, 3), (1,), (3,)])
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mean, std = pdiff.paper_stats(layout, x, [0, 1, 2, 3])  # row 4 is held out: not part of the statistics
    w = x[:4, :6]
    assert mean[:6].tolist() == pytest.approx([w.mean(1).mean().item()] * 6)  # v3: per original, then averaged
    assert std[:6].tolist() == pytest.approx([w.std(1).mean().item()] * 6)
    assert mean[6].item() == pytest.approx(x[:4, 6].mean().item()) and std[6].item() == 1.0  # one element: centred
    assert std[7:].tolist() == pytest.approx([x[:4, 7:].std(1).mean().item()] * 3)


def test_conv_autoencoder_norm_modes():
    torch.manual_seed(0)
    ae = pdiff.ConvAE(100, s=pdiff.ConvAE.DEFAULTS | {"latent": 8}, norm="batch")
    assert ae.L == 128 and ae.encode_padded(ae.pad(torch.randn(4, 100))).shape == (4, 8)
    ae.eval()
    before = copy.deepcopy(ae.state_dict())
    z = torch.randn(3, 8)
    with torch.no_grad():
        together = ae.decode(z)
        alone = torch.cat([ae.decode(z[i:i + 1]) for i in range(3)])
        kept = all(torch.equal(v, ae.state_dict()[k]) for k, v in before.items())  # running statistics untouched
        ae.train()
        by_hand = torch.cat([ae.decode_padded(z[i:i + 1])[:, :100] for i in range(3)])  # v3: train mode, batch 1
        ae.eval()
    assert together.shape == (3, 100) and torch.equal(together, alone)  # batch: one set at a time, as v3 decodes
    torch.testing.assert_close(together, by_hand)
    assert kept
    ae.norm = "running"
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(z), ae.decode_padded(z)[:, :100])  # eval mode
        assert not torch.allclose(ae.decode(z), together)


@pytest.mark.parametrize("generator", ["v3", "span+conv", "conv+mlp"])
def test_paper_generator_combines_with_pdiffs(tmp_path, generator):
    run = tmp_path / "r"
    assert cli("collect", "--run", run, "--epochs", 2, "-k", 30).exit_code == 0
    r = cli("fit", "--run", run, "--generator", generator, "--ae-steps", 2, "--denoiser-steps", 2, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    conv_ae, conv_dn = generator in ("v3", "conv+mlp"), generator in ("v3", "span+conv")
    assert rep["decoded"]["count"] == 15 and (rep["pca"] is None) == conv_ae  # 30 less 5 held-out blocks and gaps
    assert rep["generator"] == generator
    o = pdiff.open_run(run, model="default")
    m = o.model
    assert isinstance(m.ae, pdiff.ConvAE if conv_ae else pdiff.SpanAE)
    assert isinstance(m.denoiser, pdiff.ConvDenoiser if conv_dn else pdiff.MLPDenoiser)
    assert m.s["latent"] == (128 if conv_ae else 16) == len(m.z_mean)  # each part's defaults, resolved and recorded
    assert (m.s["denoiser_lr"], m.s["ema"], m.s["denoiser_weight_decay"]) == ((1e-4, 0.0, 0.0) if conv_dn else (1e-3, 0.999, 0.01))
    assert m.z_lo.isinf().all() == conv_dn  # p-diff's sampling clamps nothing
    assert (m.z_std.item() == 1.0) == conv_dn  # p-diff's denoiser learns the latents as they come
    r = cli("sample", "--run", run, "-n", 3, "--sampler", "ddim", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["generated"]["count"] == 3 and rep["generated"]["label"] == "unknown"  # 3 against 5: too few to tell
    assert rep["baselines"]["ensemble"]["median"] > 50  # baselines are the originals', whatever generator was fitted


def test_seeds_of_a_users_own_module_class(tmp_path):
    # a network defined by its own nn.Module class: the file is imported once, so all seeds share the class
    (tmp_path / "tiny.py").write_text("import torch.nn as nn\nclass Tiny(nn.Module):\n    def __init__(self, c, s, k):\n"
                                      "        super().__init__()\n        self.f = nn.Linear(c * s * s, k)\n"
                                      "    def forward(self, x):\n        return self.f(x.flatten(1))\n"
                                      "def make(c, s, k):\n    return Tiny(c, s, k)\n")
    r = cli("collect", "--run", tmp_path / "r", "--arch", f"{tmp_path / 'tiny.py'}:make", "--networks", 3, "--epochs", 1,
            "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["snapshots"]["count"] == 3 and rep["params"] == 64 * 10 + 10 and rep["snapshots"]["median"] > 50


def test_min_accuracy_draws_until_n_sets_reach_it(digits_run):
    r = cli("sample", "--run", digits_run, "-n", 5, "--sampler", "ddim", "--min-accuracy", 96.5, "--json",
            "--save", digits_run.parent / "picked.safetensors")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    g = rep["generated"]
    assert g["count"] == 5 and g["drawn"] % 5 == 0 and g["drawn"] >= 5 and g["selected_on"] == "validation"
    run = pdiff.open_run(digits_run)  # picked on the validation split, graded on the test set
    picked = read(digits_run.parent / "picked.safetensors")["samples"]
    val = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, picked, run.data.x_val, run.data.y_val))
    assert val.min() >= 96.5
    plain = cli("sample", "--run", digits_run, "-n", 5, "--sampler", "ddim", "--json", "--save",
                digits_run.parent / "plain.safetensors")
    first = read(digits_run.parent / "plain.safetensors")["samples"]  # round 0 is the plain sample's draw
    first_val = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, first, run.data.x_val, run.data.y_val))
    kept = first[first_val >= 96.5]
    assert plain.exit_code == 0 and len(kept) and torch.allclose(picked[:len(kept)], kept, rtol=0, atol=1e-6)  # the
    # same latents; decoded in another batch (the kept rows of several rounds), a float's last bit may differ
    for name, b in rep["baselines"].items():  # every baseline picked alike, from as many draws of its own
        assert b["count"] + b["failed"] <= 5 and b["drawn"] == (1 if name == "ensemble" else g["drawn"]), name
    r = cli("sample", "--run", digits_run, "-n", 3, "--sampler", "ddim", "--min-accuracy", 100, "--json")
    g = json.loads(r.stdout)["generated"]  # out of reach: the bound stops it, and the report says so
    assert r.exit_code == 0 and g["count"] == 0 and g["drawn"] == 3 * pdiff.MAX_ROUNDS
    assert json.loads(r.stdout)["verdict"] == {"label": "unknown", "text": "none of the 60 sets drawn reached "
                                                                           "--min-accuracy"}


def test_target_accuracy_steers_a_conditioned_model(tmp_path):
    run = tmp_path / "c"
    assert cli("collect", "--run", run, "--epochs", 3, "-k", 60).exit_code == 0
    assert cli("fit", "--run", run, "--condition", "--ae-steps", 300, "--denoiser-steps", 1500).exit_code == 0
    got = {}
    for target in (90, 95):  # within the originals' validation accuracies (57 to 96 %)
        r = cli("sample", "--run", run, "-n", 20, "--sampler", "ddim", "--target-accuracy", target, "--json")
        assert r.exit_code == 0, r.output
        g = json.loads(r.stdout)["generated"]
        assert g["target"] == target and g["guidance"] == 2.0  # a validation accuracy: the test set only grades
        assert g["from_target"] == pytest.approx(g["validation"]["median"] - target)
        got[target] = g["validation"]["median"], g["median"]
    assert got[95][0] - got[90][0] > 2.0  # steered where it was conditioned: measured 95.83 against 93.06
    assert got[95][1] - got[90][1] > 1.5  # and on the test set, which it never saw: 94.43 against 92.34
    r = cli("fit", "--run", tmp_path / "c", "--name", "p", "--condition", "--generator", "v3")
    assert r.exit_code == 2 and "--condition needs pdiff's denoiser" in r.output
    assert cli("fit", "--run", run, "--name", "plain", "--ae-steps", 10, "--denoiser-steps", 10).exit_code == 0
    r = cli("sample", "--run", run, "--model", "plain", "--target-accuracy", 95)
    assert r.exit_code == 2 and "--target-accuracy needs a model fitted with --condition" in r.output


# ---------------------------------------------------------------------------------------------------- neurons (#28)
# experiments/neurons.py: whole networks as sets of neurons (an equivariant flow) and the REPAIR blend baseline


def neurons_module():
    sys.path.insert(0, str(HERE / "experiments"))
    import neurons

    return neurons


def tiny_mlp_layout(n_in=5, h1=4, h2=3, out=2) -> pdiff.Layout:
    return pdiff.Layout(["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"],
                        [(h1, n_in), (h1,), (h2, h1), (h2,), (out, h2), (out,)])


def test_neuron_denoiser_is_equivariant_to_permuting_hidden_units():
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=1, batch=2, mode="layers")
    x = torch.randn(3, layout.D, generator=torch.Generator().manual_seed(0))
    gen.set_stats(x)
    with torch.no_grad():  # the output heads start at zero: give every weight a value
        for p in gen.ema.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    g = gen.graph
    assert torch.equal(g.join(*g.split(x)), x)  # the graph form holds every parameter once
    perms = [torch.tensor([4, 2, 0, 1, 3]), torch.tensor([2, 3, 1, 0])]
    xp = g.permute(x, perms)
    assert not torch.allclose(xp, x)
    for t in (torch.tensor([0.1, 0.5, 0.9]), torch.tensor([[0.0, 0.3], [0.2, 1.0], [0.7, 0.7]])):  # one, per layer
        with torch.no_grad():
            v, vp = (gen.decode(*gen.ema(*gen.encode(y), t)) for y in (x, xp))
        assert v.abs().max() > 0.1  # not trivially zero
        assert (g.permute(v, perms) - vp).abs().max() < 1e-5  # permuted in, permuted out
    s1, s2 = (gen.sample(2, torch.Generator().manual_seed(1), steps=3) for _ in range(2))
    assert s1.shape == (2, layout.D) and torch.equal(s1, s2)  # same generator, same networks
    done = gen.sample(2, torch.Generator().manual_seed(1), steps=3, given=x[:2], start=1)  # layer 1 given
    assert torch.allclose(g.split(done)[0][0], g.split(x[:2])[0][0], atol=1e-6) and not torch.allclose(done, x[:2])


def test_neuron_sampler_step_keeps_the_flows_marginals_and_temperature_spreads_layer_1():
    """The stochastic step (eta) with the true velocity of one clean point x_0 lands on the flow's marginal at t2:
    (1 - t2) x_0 + t2 * unit noise, whatever eta; eta 0 is Euler's step. spread() matches units one to one."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 64, generator=g), torch.randn(20000, 64, generator=g)
    for eta, t, t2 in ((0.0, 0.7, 0.5), (1.0, 0.7, 0.5), (0.5, 1.0, 0.9), (1.0, 0.3, 0.05)):
        gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, eta=eta)
        y = (1 - t) * x0 + t * eps
        v = eps - x0  # the true velocity for this x_0
        got = gen.step(y, v, t, t2, g)
        noise = (got - (1 - t2) * x0) / t2
        assert abs(noise.std().item() - 1) < 0.01 and noise.mean().abs() < 0.01
        kept = (noise * eps).mean().item()  # the share of the old noise kept: DDIM's sqrt(1 - (s / t2)^2)
        s = eta * t2 * (1 - ((1 - t) * t2 / ((1 - t2) * t)) ** 2) ** 0.5
        assert abs(kept - (1 - (s / t2) ** 2) ** 0.5) < 0.005
        if eta == 1:  # DDPM's posterior keeps alpha_t sigma_s / (alpha_s sigma_t) of the old noise
            assert abs(kept - (1 - t) * t2 / ((1 - t2) * t)) < 0.005
        if not eta:
            assert torch.allclose(got, y + (t2 - t) * v, atol=1e-6)
    x = torch.randn(6, layout.D, generator=g)
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=2, batch=4, mode="layers")
    gen.set_stats(x)
    mean = x.mean(0)
    p = layout.unflatten(mean[None].clone())
    p = {k: v[0] for k, v in p.items()}
    p["1.weight"], p["1.bias"] = p["1.weight"][[2, 0, 1, 4, 3]], p["1.bias"][[2, 0, 1, 4, 3]]  # its units reordered
    same = layout.pack(p)
    assert gen.spread(same[None], mean).item() < 1e-9  # matched one to one: no spread
    p["1.bias"] = p["1.bias"] + torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # one unit moved by 1 in its bias
    sd = gen.stats["tokens"][0][1][0]  # the bias's spread over units and networks
    assert torch.isclose(gen.spread(layout.pack(p)[None], mean), (1 / sd) ** 2, rtol=1e-4).all()
    gen.fit(x)
    T = gen.pick_temperature(x, n=4, steps=2)
    assert T in gen.TEMPERATURES and set(gen.temperature_scores) == set(gen.TEMPERATURES)
    assert gen.settings["temperature"] == 1.0  # picking left the setting as it was
    size = lambda v: layout.unflatten(v)["1.weight"].flatten(1).norm(dim=1)  # whole networks: any measure of them
    gen.settings["temperature"] = 1.04
    target = size(gen.sample(2, torch.Generator().manual_seed(gen.settings["seed"] + 9), steps=2)).median()
    gen.settings["temperature"] = 1.0
    assert gen.pick_temperature(x, n=4, steps=2, whole=(size, target)) == 1.04  # the one that measures as asked
    assert gen.temperature_scores[1.04] == 0 and min(v for T, v in gen.temperature_scores.items() if T != 1.04) > 0
    for mode, eta in (("layers", 0.0), ("joint", 1.0)):
        a, b = (nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, mode=mode, eta=eta,
                                   temperature=T0) for T0 in (1.0, 2.0))
        for m in (a, b):
            m.set_stats(x)  # untrained (zero velocity): the samples are linear in the noise drawn
        one, two = (m.sample(3, torch.Generator().manual_seed(1), steps=3) for m in (a, b))
        g1, g2 = gen.graph.split(one), gen.graph.split(two)
        m1 = a.stats["tokens"][0][0]
        assert torch.allclose(g2[0][0] - m1, 2 * (g1[0][0] - m1), atol=1e-5)  # hidden layer 1: twice the noise
        assert torch.allclose(g2[0][1], g1[0][1]) and torch.allclose(g2[1][0], g1[1][0])  # the rest: the flow's
        assert torch.allclose(g2[2], g1[2])  # own noise
    old = {k: v for k, v in nm.Neurons.DEFAULTS.items() if k not in ("eta", "temperature", "auto_temperature")}
    model = nm.Neurons(layout, 6, old | {"calibrate": "", "width": 16, "edge_width": 8, "depth": 2, "heads": 2})
    state = {k: v for k, v in model.state_dict().items() if k != "temperature"}  # a file from before them
    model.load_state_dict(state)  # reads, at the defaults
    assert model.temperature.item() == 1.0 and model.s["eta"] == 0.0


def test_neuron_autoguidance_guides_hidden_layer_1_away_from_a_worse_model():
    """v = (1 + w) v - w v(worse) on hidden layer 1 only: a worse model equal to the model changes nothing; an
    untrained (zero-velocity) worse model scales layer 1's velocity by 1 + w; a model of other networks is refused."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    x = torch.randn(6, layout.D, generator=torch.Generator().manual_seed(0))
    kw = dict(width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4, mode="layers", sample_steps=4)
    good = nm.NeuronGenerator(layout, **kw).fit(x)
    draw = lambda m: m.sample(3, torch.Generator().manual_seed(1))
    plain = draw(good)
    guided = nm.NeuronGenerator(layout, **kw, autoguidance=2.0)
    guided.load_state_dict(good.state_dict())
    assert torch.equal(draw(guided), plain)  # no worse model: no guidance
    twin = nm.NeuronGenerator(layout, **kw)
    twin.load_state_dict(good.state_dict())
    assert torch.allclose(draw(guided.guide_with(twin)), plain, atol=1e-5)  # (1 + w) v - w v = v
    zero = nm.NeuronGenerator(layout, **kw)  # a "worse" model whose velocity is 0
    zero.set_stats(x)
    for p in zero.ema.parameters():
        p.data.zero_()
    one = dict(kw, sample_steps=1)  # one Euler step from the noise: layer 1 = noise - (1 + w) v(noise)
    layer1 = lambda m: m.graph.split(m.sample(3, torch.Generator().manual_seed(1), stop=1, calibrate=False))[0][0]
    plain1, tripled = nm.NeuronGenerator(layout, **one), nm.NeuronGenerator(layout, **one, autoguidance=2.0)
    for m in (plain1, tripled):
        m.load_state_dict(good.state_dict())
    noise = layer1(zero)
    assert (layer1(plain1) - noise).abs().max() > 1e-3
    assert torch.allclose(layer1(tripled.guide_with(zero)) - noise, 3 * (layer1(plain1) - noise), atol=1e-4)
    other = nm.NeuronGenerator(layout, **kw)
    other.set_stats(x + 1)
    with pytest.raises(ValueError, match="same networks"):
        guided.guide_with(other)


def test_neuron_first_layer_model_learns_layer_1_alone_and_makes_it_for_another_model():
    """learn first: fit() learns from hidden layer 1 alone (networks that differ only in their later layers fit the
    same model); first_from: the first-layer model makes hidden layer 1, the other model the layers after it."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    x = torch.randn(6, layout.D, generator=torch.Generator().manual_seed(0))
    later = x.clone()
    later[:, 5 * 7:] = torch.randn(6, layout.D - 35, generator=torch.Generator().manual_seed(1))  # layers 2, 3
    kw = dict(width=16, edge_width=8, depth=2, heads=2, steps=5, batch=4, mode="layers", sample_steps=4)
    first, twin = (nm.NeuronGenerator(layout, **kw, learn="first").fit(y) for y in (x, later))
    assert all(torch.equal(a, b) for a, b in zip(first.ema.state_dict().values(), twin.ema.state_dict().values()))
    rest = nm.NeuronGenerator(layout, **kw, learn="later", seed=3).fit(x)  # the layers after it, other weights
    layer1 = lambda m, **k: m.graph.split(m.sample(3, torch.Generator().manual_seed(1), calibrate=False, **k))[0][0]
    assert not torch.allclose(layer1(rest), layer1(first))
    combined = nm.NeuronGenerator(layout, **kw, learn="later", seed=3)
    combined.load_state_dict(rest.state_dict())
    made = combined.first_from(first).sample(3, torch.Generator().manual_seed(1), calibrate=False)
    assert torch.allclose(combined.graph.split(made)[0][0], layer1(first, stop=1), atol=1e-6)  # layer 1: first's
    given = rest.sample(3, torch.Generator().manual_seed(1), calibrate=False, given=made, start=1)
    assert torch.allclose(made, given, atol=1e-5)  # the layers after it: rest's, for that layer 1
    remade = lambda m: m.renoise_first(x, torch.full((6,), 0.5), torch.Generator().manual_seed(2), steps=3)
    assert torch.allclose(remade(combined), remade(first), atol=1e-6)  # exposure re-makes layer 1 with it too
    assert not torch.allclose(remade(combined), remade(rest), atol=1e-3)
    other = nm.NeuronGenerator(layout, **kw)
    other.set_stats(x + 1)
    with pytest.raises(ValueError, match="same networks"):
        combined.first_from(other)
    with pytest.raises(ValueError, match="learn"):
        nm.NeuronGenerator(layout, **kw, learn="second")
    plain = dict(drop=0.0, guidance=0.0, calibrate="", func=0.0, first_steps=5)  # kw's settings, through pdiff's class
    model = nm.Neurons(layout, 6, nm.Neurons.DEFAULTS | kw | plain)
    model.fit(layout, x, list(range(6)), loop=types.SimpleNamespace(prog=None))
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(model.first_ema, first.ema) and not same(model.ema, first.ema)  # fitted first, as `first` was
    reopened = nm.Neurons(layout, 6, model.s)
    reopened.load_state_dict(model.state_dict())  # the file holds both denoisers
    draw = lambda m: m.draw(3, torch.Generator().manual_seed(1))
    assert torch.equal(draw(reopened), draw(model))
    assert torch.allclose(model.gen.graph.split(draw(model))[0][0], layer1(first, stop=1), atol=1e-6)


def test_neuron_rescale_keeps_each_networks_function():
    """Graph.rescale: every hidden unit's incoming weights and bias times a positive factor, its outgoing weights
    divided by it: a ReLU MLP computes the same logits with other parameters; fit(rescale) trains on such draws."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    nn = torch.nn
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, layout.D, generator=g)
    inputs = torch.randn(50, 6, generator=g)
    y = nm.Graph(layout).rescale(x, 0.5, g)
    assert y.shape == x.shape and (y - x).abs().max() > 0.1  # other parameters
    for a, b in zip(x, y):
        layout.load(net, a)
        want = net(inputs)
        layout.load(net, b)
        assert torch.allclose(net(inputs), want, atol=1e-5)  # the same function
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4, mode="layers",
                             rescale=0.2).fit(x)
    plain = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4,
                               mode="layers").fit(x)
    assert not torch.equal(gen.ema.tok_out[0][-1].weight, plain.ema.tok_out[0][-1].weight)  # other training cases
    assert gen.sample(2, torch.Generator().manual_seed(1), steps=3).isfinite().all()


def test_neuron_sample_inpaints_the_parameters_it_is_told_to_keep():
    """sample(given, start, fixed): within the layers it generates, the parameters `fixed` marks come out as given's
    (the flow's path from them to their noise is put back each step), the rest are drawn; here the output layer
    alone, for given hidden layers (neurons_diag --complete's last row)."""
    nm = neurons_module()
    import neurons_diag
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    x = torch.randn(6, layout.D, generator=torch.Generator().manual_seed(0))
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4, mode="layers").fit(x)
    keep = neurons_diag.hidden_mask(gen.graph)
    assert keep.sum() == layout.D - 4 * 3 - 3  # every parameter but the output layer's weights and biases
    y = gen.sample(2, torch.Generator().manual_seed(1), steps=4, given=x[:2], start=1, fixed=keep, calibrate=False)
    assert torch.allclose(y * keep, x[:2] * keep, atol=1e-5)  # the hidden layers as given
    assert (y - x[:2])[:, keep == 0].abs().gt(1e-3).all() and y.isfinite().all()  # the output layer drawn


def test_neuron_exposure_re_makes_every_layer_before_the_one_learnt():
    """sample(t0 < 1): SDEdit, the layers generated start from given's noised to t0 (near given for a small t0);
    exposure_layers 2: the exposure steps' networks bring hidden layers 1 and 2 re-made so (other training cases
    than layer 1 alone)."""
    nm = neurons_module()
    layout = pdiff.Layout(["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias", "7.weight", "7.bias"],
                          [(5, 6), (5,), (4, 5), (4,), (4, 4), (4,), (3, 4), (3,)])
    x = torch.randn(6, layout.D, generator=torch.Generator().manual_seed(0))
    kw = dict(width=16, edge_width=8, depth=2, heads=2, steps=4, batch=3, mode="layers", sample_steps=4, func=1.0,
              exposure_steps=3, exposure_target="function", drop=0.1, guidance=0.5)
    gen = nm.NeuronGenerator(layout, **kw).fit(x)
    hidden2 = lambda y: torch.cat([a.flatten(1) for a in (*gen.graph.split(y)[0][:2], gen.graph.split(y)[1][0])], 1)
    near, far = (gen.sample(6, torch.Generator().manual_seed(1), given=x, stop=2, t0=t0, calibrate=False)
                 for t0 in (0.01, 0.7))
    gap = lambda y: (hidden2(y) - hidden2(x)).norm(dim=1).median()
    assert gap(near) < 0.2 * gap(far) and gap(far) > 0.1  # re-made from near the given layers, or from far
    deep = nm.NeuronGenerator(layout, **kw, exposure_layers=2).fit(x)
    ema = lambda m: torch.cat([v.flatten() for v in m.ema.state_dict().values()])
    assert not torch.equal(ema(deep), ema(gen))  # the same fit, other exposure cases
    assert deep.sample(2, torch.Generator().manual_seed(1), calibrate=False).isfinite().all()
    with pytest.raises(ValueError, match="exposure_layers"):
        nm.NeuronGenerator(layout, exposure_layers=0)


def tiny_convnet() -> tuple:
    """A two-convolution chain on 1x6x6 inputs (4 then 5 channels, a Linear to 3 classes) and its layout."""
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    return net, pdiff.select_params(net, "all")


def test_neuron_graph_of_a_convnet_holds_its_kernels_and_computes_the_network():
    """Convolutions: a channel is a unit, its layer-1 kernel is in its token, the kernels between two layers' channels
    are edge vectors; the graph round-trips, forward() is the network's own output, the ReLU's symmetries keep it,
    the denoiser is equivariant to permuting channels, and a fit with the functional loss and probes samples."""
    nm = neurons_module()
    net, layout = tiny_convnet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, layout.D, generator=g) * 0.5
    graph = nm.Graph(layout, net, (1, 6, 6))
    assert graph.token_dims == [10, 4] and graph.edge_dims == [9] and graph.conv
    tokens, edges, glob = graph.split(x)
    assert edges[0].shape == (4, 5, 4, 9) and torch.equal(graph.join(tokens, edges, glob), x)
    inputs = torch.randn(7, 1, 6, 6, generator=g)
    want = []
    for v in x:
        layout.load(net, v)
        want.append(net(inputs).detach())
    assert torch.allclose(graph.forward(x, inputs), torch.stack(want), atol=1e-5)  # the network itself
    p = layout.unflatten(x)  # and what its output layer reads: the pooled last maps
    assert torch.allclose(graph.features(x, inputs) @ p["7.weight"].transpose(-1, -2) + p["7.bias"][:, None],
                          torch.stack(want), atol=1e-5)
    y = graph.rescale(x, 0.5, g)
    perms = [torch.tensor([2, 0, 3, 1]), torch.tensor([4, 1, 0, 3, 2])]
    for other in (y, graph.permute(x, perms)):
        assert (other - x).abs().max() > 0.1 and torch.allclose(graph.forward(other, inputs), torch.stack(want),
                                                                atol=1e-4)
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4, mode="layers",
                             func=1.0, calibrate="bias", net=net, in_shape=(1, 6, 6))
    gen.set_stats(x)
    with torch.no_grad():  # the output heads start at zero: give every weight a value
        for p in gen.ema.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        t = torch.tensor([0.1, 0.5, 0.9, 0.3])
        v, vp = (gen.decode(*gen.ema(*gen.encode(z), t)) for z in (x, graph.permute(x, perms)))
    assert v.abs().max() > 0.1 and (graph.permute(v, perms) - vp).abs().max() < 1e-5  # permuted in, permuted out
    gen.fit(x)
    assert gen.stats["probes"]["x"].shape == (2000, 1, 6, 6)
    s = gen.sample(3, torch.Generator().manual_seed(1), steps=3)
    assert s.shape == (3, layout.D) and s.isfinite().all()
    nn = torch.nn
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))  # reads whole maps
    with pytest.raises(ValueError, match="chain of Linear or Conv2d"):
        nm.Graph(pdiff.select_params(flat, "all"))


def test_neuron_fit_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    """A fit killed after its second checkpoint and run again ends where the uninterrupted fit ends, bit for bit
    (the functional loss's targets, the training networks' logits, are computed once and are the same)."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    x = torch.randn(8, layout.D, generator=torch.Generator().manual_seed(0))
    make = lambda: nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=7, batch=4,
                                      mode="layers", func=1.0, drop=0.1)
    whole = make()
    whole.fit(x)
    ck, saves, replace = tmp_path / "fit.ck", [], nm.os.replace

    def killed(a, b):  # the checkpoint is written, then the process dies
        replace(a, b)
        saves.append(b)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(nm.os, "replace", killed)
    monkeypatch.setattr(nm.NeuronGenerator._train, "__defaults__", (None, None, 0.0, None, 2))  # every 2 steps
    with pytest.raises(KeyboardInterrupt):
        make().fit(x, checkpoint=ck)
    assert torch.load(ck, weights_only=False)["step"] == 3
    resumed = make()
    resumed.fit(x, checkpoint=ck)
    assert len(saves) == 3  # one more checkpoint (step 5), then the end
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    other = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=9, batch=4, mode="layers")
    with pytest.raises(ValueError, match="another fit's checkpoint"):
        other.fit(x, checkpoint=ck)
    saved = torch.load(ck, weights_only=False)  # a checkpoint from before a setting existed: read at its default
    del saved["key"]["settings"]["exposure_layers"]
    torch.save(saved, ck)
    make().fit(x, checkpoint=ck)


def test_neuron_functional_loss_is_zero_for_the_true_velocity():
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=6, h1=5, h2=4, out=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, layout.D, generator=g)
    gen = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=1, batch=4, mode="layers", func=1.0)
    gen.set_stats(x)
    gen.stats["probes"] = {"x": torch.randn(300, 6, generator=g), "target": torch.full((3,), 1 / 3)}
    parts0 = gen.encode(x[:4])
    eps = nm._like(parts0, g)
    for t in (torch.tensor([[0.0, 0.5], [0.0, 0.2], [0.0, 0.9], [1.0, 0.4]]), torch.full((4, 2), 0.3)):
        xt = nm._map3(lambda a, n, tt: nm._mix(a, n, tt), parts0, eps, gen.per_part(t))
        rows, H = torch.arange(4), 2
        true_v = nm._first(nm._map2(lambda a, n: n - a, parts0, eps), 2, H)  # the velocity's target, layers 1 and 2
        assert gen.functional(parts0, xt, true_v, t, rows, 1, g).abs() < 1e-9  # x_0 recovered: the same function
        pr = nm.Probes.load(gen.graph, gen.stats["probes"])  # the networks' logits on every probe, computed once
        logits = pr.forward(gen.decode(*parts0), pr.x)  # (as _train does), give the loss that running them gives
        state = g.get_state()
        a = gen.functional(parts0, xt, nm._map(lambda v: v + 0.1, true_v), t, rows, 1, g)
        g.set_state(state)
        assert torch.allclose(gen.functional(parts0, xt, nm._map(lambda v: v + 0.1, true_v), t, rows, 1, g,
                                             want=logits), a, rtol=1e-5) and a > 1e-4
        wrong = nm._map(lambda v: v + 0.5, true_v)
        loss = gen.functional(parts0, xt, wrong, t, rows, 1, g)
        assert loss > 1e-3  # another network, another function
        if t[3, 0] == 1:  # the last network's layer 1 was dropped (pure noise, for guidance): it counts nothing
            assert gen.functional(parts0, xt, nm._index(wrong, [3]), t, torch.tensor([3]), 1, g) == 0
    # exposure_target function: a network seen with another first layer (swapped) is compared with its own function
    t = torch.full((4, 2), 0.3)
    swapped = ([nm._index(parts0, [1, 0, 3, 2])[0][0]] + parts0[0][1:], parts0[1], parts0[2])
    xt = nm._map3(lambda a, n, tt: nm._mix(a, n, tt), swapped, eps, gen.per_part(t))
    true_v = nm._first(nm._map2(lambda a, n: n - a, swapped, eps), 2, H)
    assert gen.functional(swapped, xt, true_v, t, rows, 1, g).abs() < 1e-9  # the swapped network's own
    assert gen.functional(swapped, xt, true_v, t, rows, 1, g, want=parts0) > 1e-3  # not the original's function
    with pytest.raises(ValueError, match="func > 0"):
        nm.NeuronGenerator(layout, exposure_target="function")
    fitted = nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4, mode="layers",
                                func=1.0).fit(x)
    assert fitted.sample(2, torch.Generator().manual_seed(1), steps=3).isfinite().all()
    # func_from 1: hidden layer 1 is learnt without it (a first-layer fit is then the plain one), the rest with it
    first = lambda **k: nm.NeuronGenerator(layout, width=16, edge_width=8, depth=2, heads=2, steps=3, batch=4,
                                           mode="layers", learn="first", **k).fit(x).ema.state_dict().values()
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a, b))
    assert same(first(func=1.0, func_from=1), first()) and not same(first(func=1.0), first())


def test_repair_matches_the_parents_mean_statistics_hand_checked():
    nm = neurons_module()
    layout = pdiff.Layout(["1.weight", "1.bias", "3.weight", "3.bias"], [(2, 2), (2,), (1, 2), (1,)])
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    pack = lambda w1, b1: layout.pack({"1.weight": w1, "1.bias": b1, "3.weight": torch.tensor([[1.0, -1.0]]),
                                       "3.bias": torch.tensor([0.5])})
    a, b = pack(torch.eye(2), torch.zeros(2)), pack(3 * torch.eye(2), torch.ones(2))
    # parents' pre-activations: x (mean 0, std s) and 3x + 1 (mean 1, std 3s); target mean 0.5, std 2s. A blend with
    # W = I, b = 0 (mean 0, std s) must become W = 2I, b = 0.5; the output layer stays
    out = layout.unflatten(nm.repair(pack(torch.eye(2), torch.zeros(2)), torch.stack([a, b]), layout, x))
    assert torch.allclose(out["1.weight"], 2 * torch.eye(2)) and torch.allclose(out["1.bias"], torch.full((2,), 0.5))
    assert torch.equal(out["3.weight"], torch.tensor([[1.0, -1.0]])) and out["3.bias"].item() == 0.5


def test_repair_of_a_deeper_blend_matches_every_hidden_layers_target():
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=5, h1=4, h2=3, out=2)
    g = torch.Generator().manual_seed(0)
    parents, x = torch.randn(3, layout.D, generator=g), torch.randn(200, 5, generator=g)
    fixed = nm.repair(parents.mean(0), parents, layout, x)
    for l in (0, 1):  # each hidden layer's units: mean and std equal the parents' average, later layers included
        z = torch.stack([nm.pre_activations(layout, layout.unflatten(p), x, l) for p in parents])
        got = nm.pre_activations(layout, layout.unflatten(fixed), x, l)
        assert torch.allclose(got.mean(0), z.mean(1).mean(0), atol=1e-5)
        assert torch.allclose(got.std(0), z.std(1).mean(0), atol=1e-5)
    plain = nm.pre_activations(layout, layout.unflatten(parents.mean(0)), x, 1)
    assert not torch.allclose(plain.std(0), z.std(1).mean(0), atol=1e-2)  # the plain blend's did not
    many = torch.cat([parents, torch.randn(2, layout.D, generator=g)])  # the parents' statistics, read once among
    stats = [(mu[:3], sd[:3]) for mu, sd in nm.unit_stats(many, layout, x)]  # other networks', give the same blend
    assert torch.allclose(nm.repair(parents.mean(0), parents, layout, x, stats=stats), fixed, atol=1e-6)


def test_repair_of_a_convnet_blend_matches_every_channels_target():
    """Convolutions: a channel's statistics are over every image and position, read from the network itself."""
    nm = neurons_module()
    net, layout = tiny_convnet()
    g = torch.Generator().manual_seed(0)
    parents, x = torch.randn(3, layout.D, generator=g) * 0.5, torch.randn(50, 1, 6, 6, generator=g)
    fixed = nm.repair(parents.mean(0), parents, layout, x, net)
    for l, n in ((0, 4), (1, 5)):
        z = torch.stack([nm.pre_activations(layout, layout.unflatten(p), x, l, net) for p in parents])
        got = nm.pre_activations(layout, layout.unflatten(fixed), x, l, net)
        assert got.shape == (50 * (36 if l == 0 else 9), n)  # 6x6 maps, then 3x3 after pooling
        assert torch.allclose(got.mean(0), z.mean(1).mean(0), atol=1e-5)
        assert torch.allclose(got.std(0), z.std(1).mean(0), atol=1e-5)
    layout.load(net, parents[0])  # the caught output is the first convolution's own
    assert torch.allclose(nm.pre_activations(layout, layout.unflatten(parents[0]), x, 0, net),
                          net[0](x).transpose(0, 1).flatten(1).T)
    assert torch.equal(layout.unflatten(fixed)["7.weight"], layout.unflatten(parents.mean(0))["7.weight"])


def test_neurons_quick_comparison_end_to_end(tmp_path, monkeypatch, capsys):
    nm = neurons_module()
    run = tmp_path / "seeds"
    assert cli("collect", "--run", run, "--networks", 24, "--epochs", 5).exit_code == 0
    monkeypatch.setenv("QUICK", "1")
    rows = nm.main(["--run", str(run), "--rank", "--set", "calibrate=bias"])
    table = capsys.readouterr().out
    assert "'width': 32, 'edge_width': 8, 'depth': 2" in table and "'steps': 60" in table  # QUICK's tiny settings
    assert "| generated (neurons) | 10 |" in table and "| REPAIR'd average of 16" in table
    for cal, plain in (("average of 16", "average of 16"), ("ensemble", "ensemble (weight average)")):
        assert rows[f"{cal}, calibrated"]["n"] == rows[plain]["n"]  # the blends given the same calibration
    assert rows["average of 16, calibrated"]["label"] == "averaging"
    r = rows["generated (neurons)"]["rank"]  # the diagnostic: thirds of the 10 generated networks, 3 each
    assert r["n"] == 10 and "rank (diagnostic, 10 networks)" in table
    assert all(0 <= r[k] <= 100 for k in ("probes", "validation", "random")) and (r["rho"] != r["rho"] or -1 <= r["rho"] <= 1)
    assert "19 training / 5 held-out networks" in table  # pdiff's split: 10 % of 24 seeds, at least 5 whole networks
    gen = rows["generated (neurons)"]
    assert gen["label"] in ("fresh", "inferior", "averaging", "copying", "unknown") and 0 <= gen["median"] <= 100
    assert gen["verdict"]["label"] == gen["label"] or gen["label"] == "fresh"  # pdiff.verdict: fresh may read novel
    assert rows["average of 16"]["label"] == "averaging"  # a blend reads as one
    held = rows["held-out originals"]
    assert held["median"] > 85 and held["units"] == 5
    # pdiff judges the held-out networks as halves (3 against 2 networks here): too few for any difference to show
    assert held["label"] == "unknown"


def test_probes_calibrate_the_output_bias_to_the_training_networks_mean_prediction():
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=5, h1=4, h2=3, out=3)
    g = torch.Generator().manual_seed(0)
    nets = torch.randn(6, layout.D, generator=g)
    pr = nm.Probes(nm.Graph(layout), m=12, steps=20, mixes=50).fit(nets)
    assert pr.classes.shape == (12, 5) and pr.x.shape == (50, 5) and torch.isclose(pr.target.sum(), torch.tensor(1.0))
    x = torch.randn(4, layout.D, generator=g)
    c = pr.calibrate(x, iters=500)
    assert torch.allclose(pr.forward(c, pr.x).softmax(-1).mean(1), pr.target.expand(4, -1), atol=1e-4)
    p, q = layout.unflatten(x), layout.unflatten(c)
    assert all(torch.equal(p[k], q[k]) for k in layout.names if k != "5.bias")  # only the output bias moves
    assert torch.allclose((q["5.bias"] - p["5.bias"]).mean(-1), torch.zeros(4), atol=1e-5)  # no common shift
    shifted = layout.unflatten(c.clone())
    shifted["5.bias"] = shifted["5.bias"] + torch.tensor([2.0, -1.0, 0.5])  # a calibrated network, bias moved:
    back = layout.unflatten(pr.calibrate(layout.pack(shifted, batch=1), iters=500))  # moved back, but for the
    assert torch.allclose(back["5.bias"], q["5.bias"] + 0.5, atol=1e-3)  # shift common to all classes (mean 0.5)


def test_probes_readout_refits_the_output_layer_to_the_training_networks_answers():
    """readout(): each network's output layer (only it) refitted to the training networks' mean prediction on each
    probe input. Trained on one network, the probes' answers are its own: a copy of it with its output layer
    scrambled gets back its predictions on every probe; a failed (NaN) network stays failed."""
    nm = neurons_module()
    layout = tiny_mlp_layout(n_in=5, h1=4, h2=3, out=3)
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, layout.D, generator=g)
    pr = nm.Probes(nm.Graph(layout), m=12, steps=20, mixes=50).fit(one.expand(4, -1))
    assert pr.soft.shape == (50, 3) and torch.allclose(pr.soft, pr.forward(one, pr.x)[0].softmax(-1), atol=1e-6)
    assert torch.allclose(pr.target, pr.soft.mean(0)) and pr.state()["soft"] is pr.soft
    scrambled = layout.unflatten(one.repeat(2, 1))
    scrambled["5.weight"], scrambled["5.bias"] = torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, generator=g)
    x = torch.cat([layout.pack(scrambled, batch=1), torch.full((1, layout.D), float("nan"))])
    assert (pr.forward(x[:2], pr.x).softmax(-1) - pr.soft).abs().max() > 0.1
    r = pr.readout(x)
    assert torch.allclose(pr.forward(r[:2], pr.x).softmax(-1), pr.soft.expand(2, -1, -1), atol=1e-3)
    p, q = layout.unflatten(x), layout.unflatten(r)
    assert all(torch.equal(p[k][:2], q[k][:2]) for k in layout.names if not k.startswith("5."))  # hidden layers kept
    assert r[2].isnan().all() and torch.equal(pr.apply(x[:2], "bias"), pr.calibrate(x[:2]))


def test_neurons_quick_with_calibration(tmp_path, monkeypatch, capsys):
    nm = neurons_module()
    run = tmp_path / "seeds"
    assert cli("collect", "--run", run, "--networks", 24, "--epochs", 5).exit_code == 0
    monkeypatch.setenv("QUICK", "1")
    rows = nm.main(["--run", str(run), "--no-baselines", "--set", "mode=layers", "drop=0.1", "guidance=1",
                    "calibrate=bias", "--whole-temperature", "--save-model", str(tmp_path / "m.pt")])
    assert "whole-network distance to their mean" in capsys.readouterr().out  # the temperature picked on them
    assert set(rows) == {"held-out originals", "generated (neurons)", "generated, not calibrated",
                         "diagnostic: held-out layer 1, rest generated"}
    assert 0 <= rows["generated (neurons)"]["median"] <= 100
    import neurons_diag  # its scale diagnostic on the saved model: accuracy and each tensor's size per guidance weight
    diag = neurons_diag.main([str(run), str(tmp_path / "m.pt"), "--scale", "0,1", "-n", "3"])
    assert [r["group"] for r in diag] == ["held-out originals", "guidance 0", "guidance 1"]
    assert all(len(r["rms"]) == 6 and 0.5 < r["rms"][0] < 2 for r in diag)  # mlp3: 3 weights, 3 biases
    assert all(0 <= r[k] <= 100 for r in diag[1:] for k in ("accuracy", "calibrated", "held-out layer 1"))
    assert diag[0]["accuracy"] > 80 and diag[1]["rms"] != diag[2]["rms"]  # guidance changes the networks' size
    diag = neurons_diag.main([str(run), str(tmp_path / "m.pt"), "--complete", "-n", "3"])  # held-out layers kept
    assert [r["group"] for r in diag] == ["held-out originals", "0 held-out layers, rest generated",
                                          "1 held-out layers, rest generated",
                                          "2 held-out layers, output layer generated"]
    assert diag[0]["refitted"] > 80 and all(0 <= r[k] <= 100 for r in diag[1:] for k in ("accuracy", "refitted"))
    import output_study  # where the output layer goes wrong: each study prints one line per group
    for study in ("draws", "scale", "loss", "match", "probes"):
        capsys.readouterr()
        output_study.main([str(run), str(tmp_path / "m.pt"), study, "-n", "2", "-r", "2"])
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines if "size against" not in line] == \
            ["held-out:", "generated:", "average"], study
        numbers = [float(v) for line in lines if "size against" not in line
                   for v in re.findall(r"(?<![\w.])\d+\.\d+", line)]
        assert numbers and all(0 <= v <= 100 for v in numbers), study
        if study == "draws":  # the held-out networks' own output layer first, then the one drawn for them
            assert float(re.search(r"own (\d+\.\d+)", lines[0])[1]) > 80
    # the saved model with its output layers refitted on the probes instead: every blend is given the same readout
    rows = nm.main(["--run", str(run), "--load-model", str(tmp_path / "m.pt"), "-n", "4", "--set", "calibrate=readout"])
    assert rows["REPAIR'd average of 16, calibrated [data: 500 training images]"]["n"] == \
        rows["average of 16, calibrated"]["n"] == rows["gaussian, calibrated"]["n"] == rows["generated (neurons)"]["n"] == 4
    assert rows["generated (neurons)"]["median"] != rows["generated, not calibrated"]["median"]
    # --min-accuracy: rounds of 10 until 10 reach it on the validation split, at most 20 rounds (pdiff's rule)
    rows = nm.main(["--run", str(run), "--no-baselines", "--set", "calibrate=bias", "--min-accuracy", "30",
                    "--no-ablations"])  # (without the not-calibrated and completed rows' draws)
    assert set(rows) == {"held-out originals", "generated (neurons)"}
    kept, drawn = map(int, re.search(r"(\d+) of (\d+) drawn", rows["generated (neurons)"]["seconds"]).groups())
    assert kept == rows["generated (neurons)"]["n"] <= 10 and drawn % 10 == 0 and (kept == 10 or drawn == 200)


def test_every_experiment_script_parses():
    """The scripts no test runs end to end (the benchmark, the long studies) at least compile, and the shell scripts
    parse: a refactor of pdiff.py that breaks their syntax shows here."""
    import py_compile
    scripts = sorted((HERE / "experiments").glob("*.py"))
    assert len(scripts) >= 5
    for path in scripts:
        py_compile.compile(str(path), doraise=True)
    for path in sorted((HERE / "experiments").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path


def test_your_own_generator_the_neuron_generator_end_to_end(tmp_path):
    """fit --generator FILE.py:CLASS, here experiments/neurons.py's neuron generator with tiny settings (a subclass
    with its own DEFAULTS): fitted and saved, reopened by sample, its networks (made in an arbitrary frame) aligned
    to the collection's reference before they are judged, exported as the built-in generators' are."""
    run = tmp_path / "seeds"
    assert cli("collect", "--run", run, "--networks", 24, "--epochs", 5).exit_code == 0
    gen = tmp_path / "tiny.py"
    gen.write_text(f"import sys\nsys.path.insert(0, {str(HERE / 'experiments')!r})\nfrom neurons import Neurons\n\n\n"
                   "class Tiny(Neurons):\n    DEFAULTS = {**Neurons.DEFAULTS, 'width': 32, 'edge_width': 8, 'depth': 2, "
                   "'steps': 60, 'batch': 16, 'sample_steps': 20, 'first_steps': 30}\n")  # with a first-layer model
    r = cli("fit", "--run", run, "--generator", f"{gen}:Tiny", "--latent", 8)
    assert r.exit_code == 2 and "DEFAULTS" in r.output  # the built-in generators' options are refused, not ignored
    r = cli("fit", "--run", run, "--generator", f"{tmp_path / 'none.py'}:Tiny")
    assert r.exit_code == 2 and "not found" in r.output
    r = cli("fit", "--run", run, "--generator", f"{gen}:Tiny", "--json")
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    assert fitted["generator"] == f"{gen.resolve()}:Tiny" and fitted["decoded"] is None and fitted["held_out"] == 5
    out = tmp_path / "out"
    r = cli("sample", "--run", run, "-n", 6, "--save", out / "s.safetensors", "--export", out / "best.safetensors",
            "--plot", out / "p.png", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["generated"]["count"] == 6 and len(rep["generated"]["accuracies"]) == 6 and "decoded" not in rep
    assert rep["verdict"]["label"] in ("novel", "fresh", "copying", "averaging", "inferior", "unknown")
    assert rep["steps"] == 20  # the flow's sample_steps: a full reverse process of this generator
    assert rep["baselines"]["average-finished"]["count"] == 6  # the blends given its output-bias calibration
    sets = read(out / "s.safetensors")["samples"]
    opened = pdiff.open_run(run, model="default")
    assert sets.shape == (6, opened.layout.D) and torch.equal(pdiff.into_frame(opened)(sets), sets)  # aligned
    assert opened.model.first is not None and any(k.startswith("first_ema.") for k in opened.model.state_dict())
    assert (out / "p.png").stat().st_size > 10_000
    r = cli("sample", "--run", run, "-n", 2, "--target-accuracy", 90)
    assert r.exit_code == 2 and "--target-accuracy" in r.output


def test_the_neuron_generator_through_pdiff_on_a_convnet(tmp_path):
    """convnet3 through pdiff: the generator is handed the network (its functional loss and probes run it), its
    file reopens with the network, and sample judges aligned, finite networks of the collection's layout."""
    run = tmp_path / "conv"
    r = cli("collect", "--run", run, "--arch", "convnet3", "--width", 4, "--networks", 12, "--epochs", 2)
    assert r.exit_code == 0, r.output
    gen = tmp_path / "tiny.py"
    gen.write_text(f"import sys\nsys.path.insert(0, {str(HERE / 'experiments')!r})\n"
                   "from neurons import ConvNeurons\n\n\nclass Tiny(ConvNeurons):\n"
                   "    DEFAULTS = {**ConvNeurons.DEFAULTS, 'width': 16, 'edge_width': 8, 'depth': 2, 'steps': 20, "
                   "'batch': 4, 'sample_steps': 5}\n")  # the functional loss (layers 2 on) and the probes run the net
    r = cli("fit", "--run", run, "--generator", f"{gen}:Tiny")
    assert r.exit_code == 0, r.output
    out = tmp_path / "s.safetensors"
    r = cli("sample", "--run", run, "-n", 3, "--save", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["generated"]["count"] == 3 and len(rep["generated"]["accuracies"]) == 3
    opened = pdiff.open_run(run, model="default")
    sets = read(out)["samples"]
    assert opened.model.gen.graph.conv and opened.model.gen.graph.in_shape == tuple(opened.prep.shape)
    assert opened.model.probes_x.shape[1:] == tuple(opened.prep.shape)  # probe images, kept in the file
    assert opened.model.probes_soft.shape == (2000, 10)  # and the training networks' answers, the readout's targets
    base = rep["baselines"]  # the blends given the generator's readout too, and it changed them
    assert base["average-finished"]["count"] == base["average"]["count"] == 3
    assert base["ensemble-finished"]["count"] == 1 and base["gaussian-finished"]["count"] == 3
    ens = opened.snapshots[opened.training].mean(0, keepdim=True)
    p, q = (opened.layout.unflatten(v) for v in (ens, opened.model.finish(ens)))  # finish: the output layer refitted
    assert [k for k in p if not torch.equal(p[k], q[k])] == ["10.weight", "10.bias"]
    r = cli("sample", "--run", run, "-n", 3)  # the table's legend says what those rows are
    assert r.exit_code == 0 and "-finished: given the generator's own fitting step" in " ".join(r.output.split())
    assert sets.shape == (3, opened.layout.D) and sets.isfinite().all()
    assert torch.equal(pdiff.into_frame(opened)(sets), sets)  # aligned to the collection's reference
