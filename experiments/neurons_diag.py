"""Diagnostics on a saved NeuronGenerator (mode layers): where do generated networks lose accuracy?
Accuracy only (diagnostics: they read the held-out networks and the test set, and select nothing). The held-out
networks are pdiff's Run.held_out for the run's default split (FitConfig().holdout: whole seeds), as neurons.py
without --holdout.

sdedit: the held-out networks' hidden layer 1 noised to time t, denoised by the model's layer-1 stage, then (a) the
held-out network's own later layers kept, (b) the later layers generated for it.
scale: per guidance weight, generated networks' accuracy (not calibrated, and calibrated where the model has
probes), each tensor's RMS over the training networks' (1: their size; no permutation changes it), and the same
for the later layers generated for the held-out networks' layer 1.

    python experiments/neurons_diag.py RUN MODEL.pt [GUIDANCE]         # sdedit (MODEL.pt: neurons.py --save-model)
complete: per k, the held-out networks' first k hidden layers kept and the rest generated for them (k 0: generated
whole; k all: the output layer alone generated, the last hidden layer's own parameters inpainted), accuracy as
generated, with the data-free output-bias calibration, and with the output layer refitted to the training images'
last hidden features (multinomial logistic regression; data-fitted, a diagnostic of how good the generated features
are, not a result); the held-out networks' own row read the same ways.

    python experiments/neurons_diag.py RUN MODEL.pt --scale 0,0.5,1 [-n N]
    python experiments/neurons_diag.py RUN MODEL.pt --complete [-n N]"""
import argparse, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import neurons as N
import pdiff

torch.set_num_threads(1)


@torch.no_grad()
def sdedit_first(gen, given, t0, g, steps=100):
    """given (n, D) raw -> (n, D) with hidden layer 1 noised to t0 and denoised back by the model (others kept)."""
    H = gen.graph.L - 1
    x = gen.encode(given)
    y = N._first(x, 1, H)
    eps = N._like(y, g)
    y = N._map2(lambda a, n: (1 - t0) * a + t0 * n, y, eps)
    ts = torch.linspace(t0, 0, max(2, int(steps * t0)) + 1)
    B = len(given)
    for i in range(len(ts) - 1):
        v = gen.ema(*y, ts[i].expand(B, 1))
        y = N._map2(lambda a, u: a + (ts[i + 1] - ts[i]) * u, y, v)
    return gen.decode(*N._put(x, y, 1, H))


def rms(layout: pdiff.Layout, x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (tensors,): each tensor's root mean square, averaged over the networks."""
    return torch.stack([v.flatten(1).square().mean(1).sqrt().mean() for v in layout.unflatten(x).values()])


def scale(run, gen, acc, weights: list, n: int) -> list[dict]:
    """The scale diagnostic (see the module's docstring), one row per guidance weight."""
    train, held = run.snapshots[run.training], run.snapshots[run.held_out]
    size = lambda x: [round(v, 2) for v in (rms(run.layout, x) / rms(run.layout, train)).tolist()]
    probes = N.Probes.load(gen.graph, gen.stats["probes"]) if "probes" in gen.stats else None
    rows = [{"group": "held-out originals", "accuracy": acc(held), "rms": size(held)}]
    for w in weights:
        x = gen.sample(n, torch.Generator().manual_seed(1), guidance=w, calibrate=False)
        rest = gen.sample(len(held), torch.Generator().manual_seed(3), given=held, start=1, guidance=w,
                          calibrate=False)
        rows.append({"group": f"guidance {w:g}", "accuracy": acc(x), "calibrated": probes and acc(probes.calibrate(x)),
                     "rms": size(x), "held-out layer 1": acc(rest), "its rms": size(rest)})
    return rows


def refit(run, gen, sets: torch.Tensor, steps: int = 200) -> list:
    """Test accuracy (%) of each network (n, D) with its output layer refitted (data-fitted): multinomial logistic
    regression (LBFGS, weight decay 1e-4) on the training images' last hidden features, standardised."""
    with torch.no_grad():
        xtr, xte = (run.prep(x) if gen.graph.conv else run.prep(x).flatten(1)
                    for x in (run.data.x_train, run.data.x_test))
    out = []
    for v in sets:
        with torch.no_grad():
            ftr, fte = (gen.graph.features(v[None], x)[0] for x in (xtr, xte))
        mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
        ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
        lin = torch.nn.Linear(ftr.shape[1], int(run.data.y_train.max()) + 1)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            l = torch.nn.functional.cross_entropy(lin(ftr), run.data.y_train) + 1e-4 * lin.weight.square().sum()
            l.backward()
            return l
        opt.step(loss)
        with torch.no_grad():
            out.append(100 * (lin(fte).argmax(1) == run.data.y_test).float().mean().item())
    return out


def complete(run, gen, acc, n: int) -> list[dict]:
    """The complete diagnostic (see the module's docstring), one row per number of held-out layers kept."""
    held = run.snapshots[run.held_out]
    probes = N.Probes.load(gen.graph, gen.stats["probes"]) if "probes" in gen.stats else None
    med = lambda v: round(statistics.median(v), 2)
    rows = [{"group": "held-out originals", "accuracy": acc(held), "refitted": med(refit(run, gen, held))}]
    for k in range(gen.graph.L - 1):
        t1 = time.perf_counter()
        x = (gen.sample(n, torch.Generator().manual_seed(1), calibrate=False) if k == 0 else
             gen.sample(len(held), torch.Generator().manual_seed(3), given=held, start=k, calibrate=False))
        rows.append({"group": f"{k} held-out layers, rest generated", "accuracy": acc(x),
                     "calibrated": probes and acc(probes.calibrate(x)), "refitted": med(refit(run, gen, x)),
                     "seconds": round(time.perf_counter() - t1)})
    t1, H = time.perf_counter(), gen.graph.L - 1
    x = gen.sample(len(held), torch.Generator().manual_seed(3), given=held, start=H - 1, fixed=hidden_mask(gen.graph),
                   calibrate=False)  # the output layer alone generated, for the held-out networks' hidden layers
    rows.append({"group": f"{H} held-out layers, output layer generated", "accuracy": acc(x),
                 "calibrated": probes and acc(probes.calibrate(x)), "refitted": med(refit(run, gen, x)),
                 "seconds": round(time.perf_counter() - t1)})
    return rows


def hidden_mask(graph: N.Graph) -> torch.Tensor:  # (D,): 1 on every hidden layer's parameters, 0 on the output layer's
    p = graph.layout.unflatten(torch.ones(1, graph.layout.D))
    for name in graph.pairs[-1]:
        p[name].zero_()
    return graph.layout.pack(p, batch=1)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("guidance", type=float, nargs="?", default=1.0, help="sdedit's guidance weight")
    ap.add_argument("--scale", default=None, help="the scale diagnostic at these guidance weights, e.g. 0,0.5,1")
    ap.add_argument("--complete", action="store_true", help="the complete diagnostic: held-out layers kept, the "
                    "rest generated; accuracy as generated, calibrated and with the output layer refitted")
    ap.add_argument("-n", type=int, default=10, help="generated networks per weight (scale), or whole (complete)")
    args = ap.parse_args(argv)
    run = pdiff.open_run(args.run, model=None)
    gen = N.load_generator(run, args.model)
    held = run.snapshots[run.held_out]
    acc = lambda s: round(statistics.median(pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, s,
                                                                          run.data.x_test, run.data.y_test)).tolist()), 2)
    if args.scale is not None:
        print("tensors:", ", ".join(run.layout.names))
        rows = scale(run, gen, acc, [float(w) for w in args.scale.split(",")], args.n)
        for row in rows:
            print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        return rows
    if args.complete:
        for row in (rows := complete(run, gen, acc, args.n)):
            print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        return rows
    print(f"held-out {acc(held):.2f}")
    for t0 in [0.0, 0.1, 0.2, 0.4, 0.7, 1.0]:
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(5)
        first = sdedit_first(gen, held, t0, g) if t0 else held
        rest = gen.sample(len(held), torch.Generator().manual_seed(3), given=first, start=1, guidance=args.guidance)
        print(f"t0 {t0}: own later layers {acc(first):.2f}; later layers generated {acc(rest):.2f} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
