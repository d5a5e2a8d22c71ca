"""Diagnostics on a saved NeuronGenerator (mode layers): where do generated networks lose accuracy?
SDEdit of the held-out networks' hidden layer 1: noised to time t, denoised by the model's layer-1 stage, then
(a) the held-out network's own later layers kept, (b) the later layers generated for it. Accuracy only (diagnostic:
reads the held-out networks and the test set, selects nothing). The held-out networks are pdiff's Run.held_out
for the run's default split (FitConfig().holdout: whole seeds), as neurons.py without --holdout.

    python experiments/neurons_diag.py RUN MODEL.pt [GUIDANCE]     # MODEL.pt: neurons.py --save-model"""
import statistics, sys, time
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


def main():
    run = pdiff.open_run(Path(sys.argv[1]), model=None)
    state = torch.load(sys.argv[2], weights_only=False)
    w = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    gen = N.NeuronGenerator(run.layout, **(N.NeuronGenerator.DEFAULTS | state["settings"]))
    gen.load_state_dict(state)
    held = run.snapshots[run.held_out]
    acc = lambda s: statistics.median(pdiff.accuracy(pdiff.evaluate(run.net, run.prep, run.layout, s,
                                                                    run.data.x_test, run.data.y_test)).tolist())
    print(f"held-out {acc(held):.2f}")
    for t0 in [0.0, 0.1, 0.2, 0.4, 0.7, 1.0]:
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(5)
        first = sdedit_first(gen, held, t0, g) if t0 else held
        rest = gen.sample(len(held), torch.Generator().manual_seed(3), given=first, start=1, guidance=w)
        print(f"t0 {t0}: own later layers {acc(first):.2f}; later layers generated {acc(rest):.2f} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
