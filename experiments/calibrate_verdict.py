"""How often does sample's verdict say the wrong thing? Labels of groups whose truth is known, over collections made
from several seeds, judged by pdiff's own code (measure_group, describe, judge: what `pdiff sample` runs).

    python experiments/calibrate_verdict.py                  # the quick start's protocol (200 snapshots), 10 collections
    python experiments/calibrate_verdict.py --seeds-protocol # whole networks: collect --networks 200, 10 collections
    QUICK=1 python experiments/calibrate_verdict.py          # 2 small collections, a few minutes

Groups that must read `fresh` (their share of other labels is the false-alarm rate): one half of the held-out units
judged against the other half (many random halvings); another collection's originals (another seed's run, aligned
to this reference where the collection is aligned); networks of mlp3's shape trained by another recipe
(scikit-learn's MLPClassifier on the same training images). Groups that must not read `fresh` (power): copies,
noisy copies and blends of training originals, and mixtures of copies with the fresh networks of another collection
at shares of 10, 25 and 50 % (exact copies; near copies: an original plus 0.01 of the originals' spread per
coordinate). Prints a Markdown table: per group, how often each label came out.
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pdiff  # noqa: E402

N = 50  # models per judged group
WORDS = ("fresh", "copying", "averaging", "inferior", "unknown")


def pd(*args):
    """Run a pdiff command; stop with its error line if it fails."""
    r = subprocess.run([sys.executable, str(HERE.parent / "pdiff.py"), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"pdiff {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}")


def aligned(run: pdiff.Run, sets: torch.Tensor) -> torch.Tensor:
    """Networks from elsewhere, brought into this collection's frame as `sample --judge` brings them."""
    if not run.collection.aligned:
        return sets
    spec = pdiff.symmetry(run.net, run.prep.shape)
    return pdiff.align_to(sets, run.reference, run.layout, spec,
                          match=pdiff.matcher(run.config, run.net, run.prep, spec, run.data))


def other_recipe(run: pdiff.Run, n: int, seed: int) -> torch.Tensor:
    """n networks of mlp3's shape fitted by scikit-learn's MLPClassifier (Adam, L2 1e-4, 400 iterations) on this
    collection's training images as pdiff's network sees them: independent trainings by another recipe."""
    from sklearn.neural_network import MLPClassifier
    import warnings

    with torch.no_grad():
        x = run.prep(run.data.x_train).flatten(1).numpy()
    out = []
    for s in range(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge" at 400 iterations, as intended
            m = MLPClassifier((32, 32), alpha=1e-4, max_iter=400, random_state=seed * 1000 + s).fit(
                x, run.data.y_train.numpy())
        tensors = [torch.tensor(t, dtype=torch.float32) for w, b in zip(m.coefs_, m.intercepts_) for t in (w.T, b)]
        out.append(run.layout.pack(dict(zip(run.layout.names, tensors))))
    return torch.stack(out)


def known_groups(run: pdiff.Run, other: torch.Tensor, g: torch.Generator) -> dict:
    """{name: (truth, raw sets)} made from this collection's training originals and another collection's."""
    x, std = run.snapshots[run.training], run.ruler().std
    K = len(x)
    pick = lambda m: torch.stack([x[torch.randperm(K, generator=g)[:m]].mean(0) for _ in range(N)])
    copies = lambda k: x[torch.randint(0, K, (k,), generator=g)]
    near = lambda k: copies(k) + 0.01 * std * torch.randn(k, x.shape[1], generator=g)
    fresh = lambda k: other[torch.randperm(len(other), generator=g)[:k]]
    out = {"another collection": ("fresh", fresh(N)), "training originals": ("copying", copies(N)),
           "+ noise 0.01 spread": ("copying", near(N)), "mean of 16": ("averaging", pick(16)),
           "mean of 4": ("averaging", pick(4)), "midpoint of 2 random": ("averaging", pick(2))}
    if run.collection.kind != "networks":  # consecutive snapshots: neighbours along the run
        i = torch.randint(0, K - 1, (N,), generator=g)
        out["midpoint of 2 adjacent"] = ("copying", (x[i] + x[i + 1]) / 2)
    for share in (0.1, 0.25, 0.5):
        k = round(share * N)
        out[f"{share:.0%} exact copies + another collection"] = ("copying", torch.cat([copies(k), fresh(N - k)]))
        out[f"{share:.0%} near copies + another collection"] = ("copying", torch.cat([near(k), fresh(N - k)]))
    return out


def calibrate(path: Path, other: Path, halvings: int, seed: int, fitted: bool) -> dict:
    """{group: (truth, [labels])} for one collection."""
    run = pdiff.open_run(path, model="default" if fitted else None)
    ruler, g = run.ruler(), pdiff.rng(seed, "calibrate")
    path_ = pdiff.eval_path(run.net, run.prep, run.layout, run.data.x_test, run.calibration)
    o = pdiff.open_run(other)
    sets = known_groups(run, aligned(run, o.snapshots[o.training]), g)
    if run.config.arch == "mlp3":
        sets["another recipe (scikit-learn)"] = ("fresh", aligned(run, other_recipe(run, 20, seed)))
    if fitted:
        sets["generated"] = ("?", run.model.decode(run.model.draw(N, pdiff.rng(seed, "sample"), sampler="ddim",
                                                                        steps=50)))
    m_held, _ = pdiff.held_out_group(run, ruler)
    ref, labels = (m_held, len(run.units)), collections.defaultdict(lambda: ("", []))
    for name, (truth, s) in sets.items():
        got = pdiff.describe(pdiff.measure_group(run, ruler, pdiff.Group(len(s), lambda i, s=s: s[i]), path_, False),
                             run, ref)
        labels[name] = (truth, [got["label"]])
    units = len(run.units)
    for _ in range(halvings):  # fresh: one half of the held-out units against the other half
        order = torch.randperm(units, generator=g)
        a, b = (torch.isin(m_held["unit"], order[h]).nonzero().flatten() for h in (slice(0, units // 2),
                                                                                   slice(units // 2, None)))
        half = pdiff.judge({k: v[a] for k, v in m_held.items()}, {k: v[b] for k, v in m_held.items()}, units - units // 2)
        labels["held-out half"] = ("fresh", labels["held-out half"][1] + [half["label"]])
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds-protocol", action="store_true", help="collect --networks 200 (whole networks) instead")
    ap.add_argument("--collections", type=int, default=10, help="collections made from collect seeds 0, 1000, ...")
    ap.add_argument("--halvings", type=int, default=20, help="random halvings of the held-out units per collection")
    ap.add_argument("--no-fit", action="store_true", help="leave the generated row out (no fit)")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    quick = os.environ.get("QUICK") == "1"
    coll = ["--networks", 40 if quick else 200] if a.seeds_protocol else ["-k", 60 if quick else 200]
    fit = ["--ae-steps", 200, "--denoiser-steps", 400] if quick else []
    runs, halvings = (2, 10) if quick else (a.collections, a.halvings)
    total = collections.defaultdict(lambda: ("", []))
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        paths = [root / f"{'seeds' if a.seeds_protocol else 'steps'}-{s}" for s in range(runs)]
        for s, run in enumerate(paths):  # seeds 1000 apart: --networks 200 collections share no network
            if not (run / "snapshots.safetensors").is_file():
                pd("collect", "--run", run, "--seed", 1000 * s, "--force", *coll, *(["--epochs", 10] if quick else []))
            if not a.no_fit and not (run / "model.safetensors").is_file():
                pd("fit", "--run", run, "--seed", s, "--force", *fit)
        for s, run in enumerate(paths):
            for k, (truth, v) in calibrate(run, paths[(s + 1) % runs], halvings, s, not a.no_fit).items():
                total[k] = (truth, total[k][1] + v)
    print(f"| group ({'collect --networks' if a.seeds_protocol else 'consecutive snapshots'}, {runs} collections) | "
          "truth | " + " | ".join(WORDS) + " | wrong |")
    print("|---|---|" + "---|" * len(WORDS) + "---|")
    for k, (truth, v) in total.items():
        alarms = sum(w in ("copying", "averaging", "inferior") for w in v)
        wrong = "-" if truth == "?" else f"{alarms / len(v):.0%}" if truth == "fresh" else \
            f"{sum(w == 'fresh' for w in v) / len(v):.0%}"
        print(f"| {k} | {truth} | " + " | ".join(f"{v.count(w)}/{len(v)}" for w in WORDS) + f" | {wrong} |")
    print("\nwrong: for groups that are fresh, the share read copying, averaging or inferior (false alarms; unknown "
          "is no alarm); for the others, the share read `fresh` (misses).")


if __name__ == "__main__":
    main()
