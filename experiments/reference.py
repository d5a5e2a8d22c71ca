"""Which network should the others be aligned to, and matched how? The first training network (pdiff's default)
against MergeMany's consensus of the training networks (Ainsworth et al. 2022; collect --reference mean), weight
matching (the default) against activation matching (--match activations), on the same unaligned collections:
blends of 16 aligned training networks (their median test accuracy over 20 draws, the same draws for all), the
weight average of all of them (the ensemble), how tight the aligned training networks sit (their mean distance to
their mean, raw parameter units) and the seconds each alignment takes. The held-out networks (fit's default) shape
no reference. A collection already under OUT is reused.

    python experiments/reference.py                 # digits: mlp3 w32 / w128, convnet3, LeNet-5, the BN ResNet, 32 seeds
    QUICK=1 python experiments/reference.py         # 8 seeds, 2 epochs: a minute
"""
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import pdiff  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
N = int(os.environ.get("N", 8 if QUICK else 32))
EPOCHS = ["--epochs", "2"] if QUICK else []
KINDS = {"mlp3 w32": ["--arch", "mlp3"], "mlp3 w128": ["--arch", "mlp3", "--width", "128"],
         "convnet3": ["--arch", "convnet3"],
         "LeNet-5 (28 px)": ["--arch", f"{HERE.parent}/examples/lenet5.py:make", "--image-size", "28", "--lr", "0.02"],
         "ResNet-BN 32/64": ["--arch", f"{HERE.parent}/examples/resnet_bn.py:make", *([] if QUICK else ["--epochs", "10"])]}


def collect(run: Path, args: list):
    if (run / "snapshots.safetensors").is_file():
        return
    r = subprocess.run([sys.executable, str(HERE.parent / "pdiff.py"), "collect", "--run", str(run), "--networks", str(N),
                        "--no-align", *args, *EPOCHS], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"pdiff collect failed: {r.stderr.strip().splitlines()[-1:]}")


def measure(run: pdiff.Run, x: torch.Tensor) -> tuple:
    """(median accuracy of 20 blends of 16 training networks, the ensemble's, the mean distance to their mean)."""
    train = run.training
    picks = [torch.randperm(len(train), generator=pdiff.rng(0, "blend", i))[:16].tolist() for i in range(20)]
    sets = torch.stack([x[[train[j] for j in p]].mean(0) for p in picks] + [x[train].mean(0)])
    acc = pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, sets, run.data.x_test, run.data.y_test,
                                        calibrate=run.calibration))
    return acc[:-1].median().item(), acc[-1].item(), (x[train] - x[train].mean(0)).norm(dim=1).mean().item()


def main():
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    print(f"| {N} seeds | reference, matching | blends of 16 (median) | ensemble | spread | seconds |")
    print("|---|---|---|---|---|---|")
    for kind, args in KINDS.items():
        path = out / "".join(c for c in kind.lower() if c.isalnum())
        collect(path, args)
        run = pdiff.open_run(path)
        spec, x = pdiff.symmetry(run.net, run.prep.shape), run.snapshots
        rows = {"none (unaligned)": (x, 0.0)}
        for reference, how in (("first", "weights"), ("mean", "weights"), ("first", "activations")):
            t = time.perf_counter()
            cfg = dataclasses.replace(run.config, reference=reference, match=how, align=True)
            match = pdiff.matcher(cfg, run.net, run.prep, spec, run.data)
            aligned = pdiff.align_collection(cfg, x, run.layout, spec, match)[0]
            rows[f"{reference}, {how}"] = (aligned, time.perf_counter() - t)
        for reference, (aligned, seconds) in rows.items():
            blend, ensemble, spread = measure(run, aligned)
            print(f"| {kind} | {reference} | {blend:.2f} | {ensemble:.2f} | {spread:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
