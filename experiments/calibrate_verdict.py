"""How often does sample's verdict say the wrong thing? Labels of groups whose truth is known, over collections made
from several seeds: fresh groups (one half of the held-out originals judged with the other half as the reference,
many random halvings) should read `fresh`; copies, blends and noisy copies of training originals should not.

    python experiments/calibrate_verdict.py                  # the quick start's protocol, 10 collect seeds
    python experiments/calibrate_verdict.py --seeds-protocol # whole networks: collect --seeds 200, 10 collect seeds
    QUICK=1 python experiments/calibrate_verdict.py          # 2 small collections, a minute or two

Prints a Markdown table: for each group, how often (over collections, and halvings for the fresh groups) each label
came out. Uses pdiff's own Ruler / judge, the code `pdiff sample` runs.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pdiff  # noqa: E402


def pd(*args):
    """Run a pdiff command; stop with its error line if it fails."""
    r = subprocess.run([sys.executable, str(HERE.parent / "pdiff.py"), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"pdiff {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def groups(run: pdiff.Run, ruler: pdiff.Ruler, n: int, g: torch.Generator) -> dict:
    """Groups made from the training originals whose truth is known (raw parameter sets)."""
    x = ruler.originals[ruler.rows]
    K = len(x)
    pick = lambda m: torch.stack([x[torch.randperm(K, generator=g)[:m]].mean(0) for _ in range(n)])
    noise = lambda s: x[torch.randint(0, K, (n,), generator=g)] + s * ruler.std * torch.randn(n, x.shape[1], generator=g)
    out = {"training originals": x[torch.randint(0, K, (n,), generator=g)], "+ noise 0.001": noise(0.001),
           "+ noise 1.0 (leaves the span)": noise(1.0), "mean of 16": pick(16), "mean of 4": pick(4),
           "midpoint of 2 random": pick(2)}
    if run.collection.get("kind") != "seeds":  # consecutive snapshots: neighbours along the run
        i = torch.randint(0, K - 1, (n,), generator=g)
        out["midpoint of 2 adjacent"] = (x[i] + x[i + 1]) / 2
    return out


def calibrate(path: Path, n: int, halvings: int, seed: int) -> dict:
    """{group: [labels]} for one run: each known group once, the fresh group once per random halving."""
    run = pdiff.open_run(path, model="default")
    ruler, per = run.ruler(), run.collection.get("per_network", 1) if run.collection.get("kind") == "seeds" else 1
    held = run.snapshots[run.held_out]
    m_held = ruler.measure(held, run.correct[run.held_out])
    g = pdiff.rng(seed, "calibrate")
    sets = groups(run, ruler, n, g)
    sets["generated"] = run.model.decode(run.model.generate(n, pdiff.rng(seed, "sample"), sampler="ddim", steps=50))
    correct = pdiff.evaluate(run.net, run.prep, run.layout, torch.cat(list(sets.values())), run.data.x_test,
                             run.data.y_test, calibrate=run.calibration)
    labels = collections.defaultdict(list)
    for (name, s), c in zip(sets.items(), correct.split([len(s) for s in sets.values()])):
        labels[name].append(pdiff.judge(ruler.measure(s, c), m_held, len(held) // per)["label"])
    units = len(held) // per
    for _ in range(halvings):  # fresh: one half of the held-out networks against the other half
        order = torch.randperm(units, generator=g)
        a, b = ([u * per + i for u in order[h].tolist() for i in range(per)] for h in (slice(0, units // 2),
                                                                                    slice(units // 2, None)))
        labels["held-out half (fresh)"].append(pdiff.judge({k: v[a] for k, v in m_held.items()},
                                                           {k: v[b] for k, v in m_held.items()}, len(b) // per)["label"])
    return labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds-protocol", action="store_true", help="collect --seeds 200 (whole networks) instead")
    ap.add_argument("--collections", type=int, default=10, help="collect seeds 0..N-1")
    ap.add_argument("--halvings", type=int, default=20, help="random halvings of the held-out originals per run")
    ap.add_argument("-n", type=int, default=50, help="models per known group")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    quick = os.environ.get("QUICK") == "1"
    coll = ["--seeds", 40 if quick else 200] if a.seeds_protocol else ["-k", 60 if quick else 200]
    fit = ["--ae-steps", 200, "--ddpm-steps", 400] if quick else []
    runs, halvings = (2, 10) if quick else (a.collections, a.halvings)
    total = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        for s in range(runs):
            run = root / f"{'seeds' if a.seeds_protocol else 'steps'}-{s}"
            if not (run / "model.safetensors").is_file():
                pd("collect", "--run", run, "--seed", s, "--force", *coll, *(["--epochs", 10] if quick else []))
                pd("fit", "--run", run, "--seed", s, "--force", *fit)
            for k, v in calibrate(run, a.n, halvings, s).items():
                total[k] += v
    words = ("fresh", "copying", "averaging", "inferior", "unknown")
    print(f"| group ({'collect --seeds' if a.seeds_protocol else 'consecutive snapshots'}, {runs} collections) | "
          + " | ".join(words) + " |")
    print("|---|" + "---|" * len(words))
    for k, v in total.items():
        print(f"| {k} | " + " | ".join(f"{v.count(w)}/{len(v)}" for w in words) + " |")


if __name__ == "__main__":
    main()
