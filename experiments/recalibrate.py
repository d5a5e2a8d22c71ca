"""How many training batches does BatchNorm recalibration need? On an aligned collection of networks with BatchNorm
(collect --networks with, e.g., --arch examples/resnet_bn.py:make), the training networks, blends of 16 of them (20
draws) and their weight average (the ensemble), evaluated with running statistics recomputed on B training
batches of --batch-size for several B, and with none recomputed: the statistics of the first network, which the
network file holds (what a blend would get if pdiff kept one network's statistics).

    python experiments/recalibrate.py RUN [B ...]      (default B: 1 2 5 10 20 50)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pdiff  # noqa: E402


def main(run_path: str, counts: list):
    run = pdiff.open_run(Path(run_path))
    if run.calibration is None:
        sys.exit(f"{run_path}: not a --networks collection of networks with BatchNorm")
    train, x = run.training, run.snapshots
    picks = [torch.randperm(len(train), generator=pdiff.rng(0, "blend", i))[:16].tolist() for i in range(20)]
    groups = {"training networks": x[train], "blends of 16": torch.stack([x[[train[j] for j in p]].mean(0)
                                                                          for p in picks]),
              "ensemble": x[train].mean(0, keepdim=True)}
    print("| batches | " + " | ".join(f"{g} (median)" for g in groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for b in counts:
        xs = pdiff.calibration_batches(run.data, b, run.config.batch_size, run.config.seed) if b else None
        accs = [pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, s, run.data.x_test, run.data.y_test,
                                              calibrate=xs)).median().item() for s in groups.values()]
        label = f"{b} x {run.config.batch_size}" if b else "none (the first network's)"
        print(f"| {label} | " + " | ".join(f"{a:.2f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in sys.argv[2:]] or [0, 1, 2, 5, 10, 20, 50])
