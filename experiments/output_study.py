"""Where a saved NeuronGenerator's output layer goes wrong (neurons.md E43): four studies on the same draws (n generated
networks, sample seed 1; the first n held-out networks; n averages of 16 training networks), test accuracy, median.

draws: the output layer drawn R times for each network's hidden layers (inpainting: sample(fixed=)) and averaged;
       as generated / output bias calibrated / refitted on the probes.
scale: each hidden layer's mean activation RMS on the probes against the training networks', and the networks with
       one factor per hidden layer that makes it theirs (a data-free rescaling), read the same three ways.
loss:  the probe readout's loss: cross-entropy to the mean soft answer at temperature 1 / 2 / 4, to the softmax of
       the mean logit, squared error to the mean centred logits (validation / test).
match: an output layer read off the units' functions: each last hidden unit's column the mean of its k nearest
       training units' columns (by the correlation of their activations on 1,000 probes), scaled by the two units'
       activation sizes; the output bias the training networks' mean.
probes: the probe readout on probes made with image priors (Probes seed 1): the inputs clamped to the range Prep gives
       pixels 0-1, a total-variation penalty, a uniform start, no L2 (validation / test).

    python experiments/output_study.py RUN MODEL.pt {draws,scale,loss,match,probes} [-n 20] [-r 8]"""
import argparse, statistics, sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))
import neurons as N
import neurons_diag
import pdiff

torch.set_num_threads(1)


def groups(run, gen, n: int) -> dict:
    x_train = run.snapshots[run.training]
    g16 = torch.Generator().manual_seed(3)
    return {"held-out": run.snapshots[run.held_out][:n],
            "generated": gen.sample(n, torch.Generator().manual_seed(1), calibrate=False),
            "average of 16": torch.stack([x_train[torch.randperm(len(x_train), generator=g16)[:16]].mean(0)
                                          for _ in range(n)])}


def draws(run, gen, pr, acc, sets, r: int):
    H = gen.graph.L - 1
    for name, x in sets.items():
        made = [gen.sample(len(x), torch.Generator().manual_seed(100 + i), given=x, start=H - 1, calibrate=False,
                           fixed=neurons_diag.hidden_mask(gen.graph)) for i in range(r)]
        one, avg = made[0], torch.stack(made).mean(0)
        print(f"{name}: own {acc(x)} | one draw / mean of {r}: {acc(one)} / {acc(avg)}, calibrated "
              f"{acc(pr.calibrate(one))} / {acc(pr.calibrate(avg))}, readout {acc(pr.readout(one))} / "
              f"{acc(pr.readout(avg))}", flush=True)


def layer_rms(run, gen, pr, x: torch.Tensor) -> torch.Tensor:  # (B, H): post-ReLU activation RMS on the probes
    H, seen = gen.graph.L - 1, {}
    mods = [m for m in run.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][:H]
    hooks = [m.register_forward_hook(lambda m, i, o, l=l: seen.__setitem__(l, o)) for l, m in enumerate(mods)]
    out = []
    try:
        for v in x:
            with torch.no_grad():
                torch.func.functional_call(run.net, run.layout.unflatten(v), (pr.x,))
            out.append(torch.stack([seen[l].relu().square().mean().sqrt() for l in range(H)]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out)


def scale(run, gen, pr, acc, sets):
    target = layer_rms(run, gen, pr, run.snapshots[run.training][:30]).mean(0)
    for name, x in sets.items():
        print(f"{name}: size against the training networks' {(layer_rms(run, gen, pr, x).mean(0) / target).tolist()}")
        y = x.clone()
        for l, (w, b) in enumerate(gen.graph.pairs[:-1]):
            r, p = layer_rms(run, gen, pr, y)[:, l] / target[l], run.layout.unflatten(y)
            p[w], p[b] = p[w] / r.view(-1, *[1] * (p[w].dim() - 1)), p[b] / r[:, None]
            y = run.layout.pack(p, batch=1)
        print(f"{name}: as is {acc(x)} / {acc(pr.calibrate(x))} / {acc(pr.readout(x))}; rescaled {acc(y)} / "
              f"{acc(pr.calibrate(y))} / {acc(pr.readout(y))}", flush=True)


def loss(run, gen, pr, acc, sets):
    with torch.no_grad():
        tl = torch.cat([gen.graph.forward(c, pr.x) for c in run.snapshots[run.training].split(8)])
    tl = tl - tl.mean(-1, keepdim=True)
    mean_logit = tl.mean(0)

    def readout(x, kind: str, T: float):  # the probe readout (Probes.readout) with another loss
        want = (tl / T).softmax(-1).mean(0) if kind == "ce" else (mean_logit / T).softmax(-1)
        return pr.readout(x, loss=(lambda z: (z - z.mean(-1, keepdim=True) - mean_logit).square().mean()) if
                          kind == "mse" else lambda z: F.cross_entropy(z / T, want))
    for name, x in sets.items():
        print(f"{name}: " + " | ".join(f"{kind} T {T}: {acc(y, 'val')} / {acc(y)}" for kind, T in
                                       [("ce", 1.0), ("ce", 2.0), ("ce", 4.0), ("ens", 1.0), ("mse", 1.0)]
                                       for y in [readout(x, kind, T)]), flush=True)


def match(run, gen, pr, acc, sets):
    probes, (wn, bn) = pr.x[:1000], pr.pairs[-1]
    x_train = run.snapshots[run.training]
    centre = lambda a: (a - a.mean(1, keepdim=True)) / (a - a.mean(1, keepdim=True)).norm(dim=1, keepdim=True
                                                                                      ).clamp_min(1e-6)
    with torch.no_grad():
        bank_a = gen.graph.features(x_train, probes).transpose(1, 2).flatten(0, 1)  # (K units, N)
    p_train = run.layout.unflatten(x_train)
    bank_w = p_train[wn].transpose(1, 2).flatten(0, 1)  # (K units, out): each unit's output column
    rms, bank = bank_a.square().mean(1).sqrt(), centre(bank_a)

    def matched(x, k):
        p = run.layout.unflatten(x.clone())
        with torch.no_grad():
            feats = gen.graph.features(x, probes)
        for i in range(len(x)):
            a = feats[i].T
            top = (centre(a) @ bank.T).topk(k, dim=1)
            w = top.values.clamp_min(0) / top.values.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-6)
            size = rms[top.indices] / a.square().mean(1).sqrt()[:, None].clamp_min(1e-6)
            p[wn][i], p[bn][i] = (bank_w[top.indices] * (size * w)[..., None]).sum(1).T, p_train[bn].mean(0)
        return run.layout.pack(p, batch=1)
    for name, x in sets.items():
        print(f"{name}: own {acc(x)} / {acc(pr.calibrate(x))} | " + " | ".join(
            f"k {k}: {acc(y)} / {acc(pr.calibrate(y))}" for k in (1, 8, 32) for y in [matched(x, k)]), flush=True)


def probes(run, gen, pr, acc, sets):
    lo, hi = (-run.prep.mean / run.prep.std).min().item(), ((1 - run.prep.mean) / run.prep.std).max().item()
    kinds = {"default": {}, "clamped": dict(box=(lo, hi)), "clamped, no L2": dict(box=(lo, hi), wd=0.0),
             "TV 0.1": dict(tv=0.1), "TV 1": dict(tv=1.0), "clamped, TV 0.3": dict(box=(lo, hi), tv=0.3),
             "clamped, uniform start, no L2": dict(box=(lo, hi), uniform=True, wd=0.0),
             "clamped, TV 1, no L2": dict(box=(lo, hi), tv=1.0, wd=0.0)}
    made = {k: N.Probes(gen.graph, seed=1, image=run.prep.shape, **kw).fit(run.snapshots[run.training])
            for k, kw in kinds.items()}
    for name, x in sets.items():
        print(f"{name}: " + " | ".join(f"{k}: {acc(y, 'val')} / {acc(y)}" for k, p in made.items()
                                       for y in [p.readout(x)]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("study", choices=["draws", "scale", "loss", "match", "probes"])
    ap.add_argument("-n", type=int, default=20, help="networks per group")
    ap.add_argument("-r", type=int, default=8, help="output layers drawn per network (draws)")
    args = ap.parse_args(argv)
    run = pdiff.open_run(args.run, model=None)
    gen = N.load_generator(run, args.model)
    pr = N.Probes.load(gen.graph, gen.stats["probes"]).answers(run.snapshots[run.training])
    data = {"test": (run.data.x_test, run.data.y_test), "val": (run.data.x_val, run.data.y_val)}
    acc = lambda x, split="test": round(statistics.median(pdiff.accuracy(pdiff.evaluate(
        run.net, run.prep, run.layout, x, *data[split])).tolist()), 2)
    sets = groups(run, gen, args.n)
    study = {"draws": lambda: draws(run, gen, pr, acc, sets, args.r), "scale": lambda: scale(run, gen, pr, acc, sets),
             "loss": lambda: loss(run, gen, pr, acc, sets), "match": lambda: match(run, gen, pr, acc, sets),
             "probes": lambda: probes(run, gen, pr, acc, sets)}
    study[args.study]()


if __name__ == "__main__":
    main()
