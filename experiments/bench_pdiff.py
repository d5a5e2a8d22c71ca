"""Benchmark of pdiff's hot paths, run by hand (not a test). Takes a few minutes on 2 CPU cores.

    python experiments/bench_pdiff.py                       # full run; table on stderr, JSON on stdout
    python experiments/bench_pdiff.py --quick --json b.json # smaller sizes; JSON into b.json
    python experiments/bench_pdiff.py --device cuda
    python experiments/bench_pdiff.py --only evaluate --n-test 128 --threads 1   # one part, other sizes

Everything is measured side by side in one run, after a warm-up, with time.perf_counter (synchronised on
CUDA); "median" means the median of --repeat timings. Random data come from torch with fixed seeds.

1. evaluate: n=64 BN-subset parameter sets of a CIFAR-shaped resnet18 (layer4.1.bn1 + bn2, D=2048) on
   a random 3x32x32 uint8 test set with 100 classes (size printed; small so the loop stays short), labelled
   with the unperturbed net's own predictions; sets = the net's vector + N(0, 0.05^2) noise.
   batched = pdiff.evaluate (frozen front once, vmapped tail), loop = pdiff.evaluate(path="loop") (one full forward
   per set), floor = one front pass over the test set + 64 x one tail pass for a single set.
   That floor counts layer4.1.conv1 (before bn1, so the same for every set) 64 times where evaluate can
   run it once; "tight floor" = front + that conv once + 64 x (tail - that conv) is reported beside it.
   Goals: batched / floor <= 1.25, loop / batched >= 9. The batched and loop masks must be identical.
2. sampling: the digits quick start (collect, fit, sample, as subprocesses of pdiff.py into a temporary
   run folder); "sample -n 50" with DDPM (1000 steps) and DDIM (50 steps). generate = the seconds the
   sample JSON reports for generation alone (one cold call); warm = median of --repeat calls of
   Model.generate(50) in this process on the same run folder, after a warm-up. Accuracy best/mean/median/
   min of the 50 generated models (from the CLI). Goal: DDPM / DDIM warm generate time >= 15.
3. quick start: wall seconds of each subprocess (collect, fit, sample ddpm, sample ddim), same runs as 2.
4. collect stage 2: resnet18 on 512 random CIFAR-shaped images, batch 64, k snapshots, epochs 0;
   seconds per snapshot with shortcut=True (frozen front under no_grad, gradients only through the
   tail) vs shortcut=False (gradients through the whole network). Per snapshot = median interval
   between snapshot ticks; collect's final evaluation of the K snapshots (16 test images) is outside
   those intervals, and is timed separately. Both paths must give the same snapshots.
Each section also reports the share of all CPUs that other processes took while it ran (from /proc/stat
minus this process and its children): on a shared machine torch's threads wait for each other and the
timings grow many-fold (seen: 13x for the digits collect), so trust a run only where it is ~0%.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent.parent  # the checkout: pdiff.py beside experiments/
sys.path.insert(0, str(HERE))
import pdiff  # noqa: E402

err = Console(stderr=True, width=None if sys.stderr.isatty() else 110)


def hardware(dev: torch.device) -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.processor() or "unknown")
    hw = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "device": str(dev), "python": platform.python_version(),
          "pdiff_sha256": hashlib.sha256((HERE / "pdiff.py").read_bytes()).hexdigest()[:12]}
    if dev.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(dev)
    return hw


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine incl. hypervisor steal, CPU seconds of this process and its
    finished children), or None where there is no /proc/stat (macOS). Their difference over a section is
    what other processes took from us."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    v = [int(f) for f in stat.read_text().split("\n", 1)[0].split()[1:9]]
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


@contextmanager
def section(r: dict, name: str):
    """Records the share of all CPUs that *other* processes used while `name` ran (0: we had the machine;
    None: not measurable on this system)."""
    c0, w0 = cpu_seconds(), time.perf_counter()
    yield
    c1, w1 = cpu_seconds(), time.perf_counter()
    share = None if c0 is None else max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / ((w1 - w0) * (os.cpu_count() or 1))
    r.setdefault("foreign_cpu_share", {})[name] = None if share is None else round(share, 3)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def timed(fn, dev, repeat=1):
    """(median seconds, all timings, last result) of fn() called `repeat` times (warm up before calling)."""
    times, out = [], None
    for _ in range(repeat):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def cifar_like(n: int, seed: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(dev), torch.randint(0, 100, (n,), generator=g).to(dev)


def resnet(dev):
    torch.manual_seed(0)
    net, ch, size = pdiff.build_net("resnet18", 3, 32, 100)
    net = net.to(dev)
    return net, pdiff.select_params(net, "norm"), pdiff.Prep([0.5] * 3, [0.25] * 3, ch, size).to(dev)


# ---------------------------------------------------------------------------------------------------- 1


def bench_evaluate(dev, n_test: int, n_sets: int, repeat: int, noise: float = 0.05) -> dict:
    net, layout, prep = resnet(dev)
    net.eval()
    x, _ = cifar_like(n_test, 1, dev)
    with torch.no_grad():
        y = net(prep(x)).argmax(1)  # the net's own predictions: the masks then mix right and wrong
    g = torch.Generator().manual_seed(2)
    sets = layout.flatten(net).cpu() + noise * torch.randn(n_sets, layout.D, generator=g)  # (n, D)
    err.print(f"[1] evaluate: resnet18, {layout.D} generated parameters ({', '.join(layout.names)}), "
              f"{n_sets} sets, test set of {n_test} random images")
    front, tail = pdiff.split_net(net, prep, layout)
    one = layout.unflatten(sets[0].to(dev))
    with torch.no_grad(), pdiff.autocast(dev):
        h = front(x)  # warm-up
        pdiff.run_tail(tail, one, h)
        t_front, _, h = timed(lambda: front(x), dev, repeat)
        t_tail, _, _ = timed(lambda: pdiff.run_tail(tail, one, h), dev, max(3, repeat))
        # layer4.1.conv1 precedes bn1: it reads only h, so vmap runs it once per chunk, not once per set
        t_shared, _, _ = timed(lambda: net.layer4[1].conv1(h), dev, max(3, repeat))
    floor = t_front + n_sets * t_tail
    tight = t_front + t_shared + n_sets * (t_tail - t_shared)
    pdiff.evaluate(net, prep, layout, sets[:2], x, y)  # warm-up (vmap, allocator)
    pdiff.evaluate(net, prep, layout, sets[:1], x, y, path="loop")
    t_batched, tb, mask_b = timed(lambda: pdiff.evaluate(net, prep, layout, sets, x, y), dev, repeat)
    t_loop, _, mask_l = timed(lambda: pdiff.evaluate(net, prep, layout, sets, x, y, path="loop"), dev, 1)  # the slow one: once
    diff = int((mask_b != mask_l).sum())
    err.print(f"    masks batched vs loop: {'identical' if diff == 0 else f'[red]{diff} entries differ[/red]'} "
              f"(accuracy {pdiff.accuracy(mask_b).mean():.2f}% mean over sets)")
    return {"n_sets": n_sets, "n_test": n_test, "noise": noise, "D": layout.D, "params": layout.names,
            "front_s": t_front, "tail_one_set_s": t_tail, "floor_s": floor, "shared_conv_s": t_shared,
            "tight_floor_s": tight, "batched_over_tight_floor": t_batched / tight, "batched_s": t_batched,
            "batched_runs_s": tb, "loop_s": t_loop, "batched_over_floor": t_batched / floor,
            "loop_over_batched": t_loop / t_batched, "masks_identical": diff == 0, "masks_differing": diff}


# ---------------------------------------------------------------------------------------------------- 2, 3


def pdiff_cli(args: list, run: Path, device: str, log: Path) -> tuple[float, dict]:
    """Run `python pdiff.py ARGS --run RUN --json`; (wall seconds, its JSON)."""
    cmd = [sys.executable, str(HERE / "pdiff.py"), *args, "--run", str(run), "--device", device, "--json"]
    t = time.perf_counter()
    with open(log, "ab") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed with code {p.returncode}; see {log}:\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return wall, json.loads(p.stdout)


def warm_generate(run: Path, dev, repeat: int) -> dict:
    """Median seconds of model.draw(50) and decoding per sampler, in this process, after a warm-up call: the CLI's
    single cold timing carries one-time costs (first kernel calls) that weigh on DDIM's ~0.2 s."""
    model = pdiff.open_run(run, dev, model="default").model
    gen = lambda s: model.decode(model.draw(50, pdiff.rng(0, "sample"), sampler=s, steps=50 if s == "ddim" else None))
    gen("ddim")
    return {s: timed(lambda: gen(s), dev, repeat)[0] for s in ("ddim", "ddpm")}


def bench_quickstart(device: str, quick: bool, keep: bool, repeat: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pdiff-bench-"))
    run, log = tmp / "run", tmp / "stderr.log"
    fit_args = ["--ae-steps", "300", "--denoiser-steps", "600"] if quick else []
    err.print(f"[2,3] digits quick start in {run} (stderr of the stages in {log})" + (f"; fit {' '.join(fit_args)}" if quick else ""))
    wall, out = {}, {}
    for stage, args in [("collect", ["collect"]), ("fit", ["fit", *fit_args]),
                        ("sample_ddpm", ["sample", "-n", "50"]), ("sample_ddim", ["sample", "-n", "50", "--sampler", "ddim"])]:
        wall[stage], out[stage] = pdiff_cli(args, run, device, log)
        err.print(f"    {stage}: {wall[stage]:.1f} s")
    samplers = {s: {"steps": out[f"sample_{s}"]["steps"], "seconds": out[f"sample_{s}"]["seconds"],
                    "generated": {k: out[f"sample_{s}"]["generated"][k] for k in ("best", "mean", "median", "min")}}
                for s in ("ddpm", "ddim")}
    res = {"wall_s": wall, "samplers": samplers, "original": out["sample_ddpm"]["original"],
           "ddpm_over_ddim_generate": samplers["ddpm"]["seconds"]["generate"] / samplers["ddim"]["seconds"]["generate"],
           "fit_args": fit_args, "snapshots": out["collect"]["snapshots"], "roundtrip": out["fit"]["decoded"]}
    res["warm_generate_s"] = warm_generate(run, pdiff.pick_device(device), repeat)
    res["ddpm_over_ddim_warm"] = res["warm_generate_s"]["ddpm"] / res["warm_generate_s"]["ddim"]
    if not keep:
        shutil.rmtree(tmp)
    return res


# ---------------------------------------------------------------------------------------------------- 4


class Ticks:
    """Stands in for pdiff's rich Progress: records when each task's ticks arrive."""

    def __init__(self):
        self.t: list[list[float]] = []

    def add_task(self, description, total=None, completed=0):
        self.t.append([time.perf_counter()])
        return len(self.t) - 1

    def advance(self, task):
        self.t[task].append(time.perf_counter())


def bench_collect(dev, k: int, n_train: int = 512, n_test: int = 16) -> dict:
    x_tr, y_tr = cifar_like(n_train, 3, dev)
    x_te, y_te = cifar_like(n_test, 4, dev)
    data = pdiff.Data(x_tr, y_tr, x_te, y_te, classes=100, mean=[0.5] * 3, std=[0.25] * 3, augment=True)
    err.print(f"[4] collect stage 2: resnet18, {n_train} train images, batch 64, k={k}, epochs 0, test set {n_test}")

    def one(shortcut: bool, k: int):
        net, layout, prep = resnet(dev)
        cfg = pdiff.CollectConfig(arch="resnet18", epochs=0, k=k, batch_size=64, checkpoint_every=10**9)
        ticks = Ticks()
        sync(dev)
        t = time.perf_counter()
        snaps = pdiff.collect_snapshots(cfg, data, net, prep, layout, pdiff.Loop(prog=ticks), shortcut=shortcut)
        sync(dev)
        total = time.perf_counter() - t
        t_eval, _, _ = timed(lambda: pdiff.evaluate(net, prep, layout, snaps, x_te, y_te), dev, 1)
        steps = [b - a for a, b in zip(ticks.t[-1], ticks.t[-1][1:])]  # stage 2 is the only task
        return snaps, {"total_s": total, "eval_s": t_eval, "snapshot_s": steps, "per_snapshot_s": statistics.median(steps)}

    res = {"k": k, "n_train": n_train, "n_test": n_test, "batch": 64}
    one(True, 1), one(False, 1)  # warm-up of both paths
    (s_short, res["shortcut"]), (s_naive, res["naive"]) = one(True, k), one(False, k)
    res["snapshots_max_abs_diff"] = float((s_short - s_naive).abs().max())
    res["naive_over_shortcut"] = res["naive"]["per_snapshot_s"] / res["shortcut"]["per_snapshot_s"]
    err.print(f"    shortcut {res['shortcut']['per_snapshot_s']:.3f} s/snapshot, naive {res['naive']['per_snapshot_s']:.3f} s/snapshot, "
              f"snapshots differ by at most {res['snapshots_max_abs_diff']:.2e}")
    return res


# ---------------------------------------------------------------------------------------------------- 5, 6


def bench_seeds(dev, n: int, epochs: int) -> dict:
    """[5] N mlp3 networks on digits, stage 1 (30 epochs): trained together (pdiff's stacked, vmapped path, one
    group) vs one after another (pdiff's single-network train_network, N times). Same seeds, same recipe."""
    d = pdiff.load_data("digits").to(dev)
    cfg = pdiff.CollectConfig(networks=n, epochs=epochs, checkpoint_every=10**9)
    prep = pdiff.Prep(d.mean, d.std, 1, 8).to(dev)
    make = lambda s: pdiff.collect_network(pdiff.dataclasses.replace(cfg, seed=s), d, dev, weights=True)
    layout, seeds = make(0)[2], list(range(n))
    err.print(f"[5] {n} mlp3 networks on digits, {epochs} epochs: together vs one after another")
    nets = [make(s)[0] for s in seeds]
    rows = torch.zeros(n, 1, layout.D)
    t_together, _, _ = timed(lambda: pdiff.train_stacked(cfg, d, seeds, nets, prep, layout, pdiff.Loop(), rows), dev)
    alone = lambda: [pdiff.train_network(pdiff.dataclasses.replace(cfg, seed=s), d, make(s)[0], prep, pdiff.Loop())
                     for s in seeds]
    t_alone, _, _ = timed(alone, dev)
    err.print(f"    together {t_together:.1f} s, one after another {t_alone:.1f} s")
    return {"n": n, "epochs": epochs, "together_s": t_together, "alone_s": t_alone, "alone_over_together": t_alone / t_together}


def bench_torchrun(quick: bool) -> dict:
    """[6] The same commands in 1 process (torch's default threads) and under torchrun with 2 processes
    (1 thread each) on the CPU: collect --networks N and sample -n 200 (evaluation spread). Seconds from the
    commands' JSON (interpreter start excluded); wall seconds beside them."""
    tmp = Path(tempfile.mkdtemp(prefix="pdiff-bench-"))
    n, log = 50 if quick else 200, tmp / "stderr.log"
    steps = [("collect", ["collect", "--networks", str(n)], "total"), ("fit", ["fit", "--ae-steps", "200", "--denoiser-steps", "200"], None),
             ("sample", ["sample", "-n", "200", "--sampler", "ddim"], "evaluate")]
    err.print(f"[6] torchrun: 2 processes vs 1 on the CPU; collect --networks {n}, sample -n 200 (stderr in {log})")
    res = {}
    for procs in (1, 2):
        run = tmp / f"run{procs}"
        for stage, args, key in steps:
            launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                           "--nproc-per-node", "2", "--"]
            env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if procs == 2 else {})}
            t = time.perf_counter()
            with open(log, "ab") as f:
                p = subprocess.run([*launcher, str(HERE / "pdiff.py"), *args, "--run", str(run), "--device", "cpu", "--json"],
                                   stdout=subprocess.PIPE, stderr=f, env=env)
            if p.returncode:
                raise SystemExit(f"bench: {stage} with {procs} processes failed; see {log}")
            if key:
                res[f"{stage}_{procs}"] = {"seconds": json.loads(p.stdout)["seconds"][key], "wall_s": time.perf_counter() - t}
    res.update({f"{s}_1_over_2": res[f"{s}_1"]["seconds"] / res[f"{s}_2"]["seconds"] for s in ("collect", "sample")})
    shutil.rmtree(tmp)
    return {"n_seeds": n, **res}


# ---------------------------------------------------------------------------------------------------- 7

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}  # dense bf16 tensor FLOP/s from the vendors' data sheets


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0):
    """Random 32x32 images in torchvision's CIFAR-100 files (cifar-100-python/{train,test,meta} pickles)."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        data = torch.randint(0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 100, (n,), generator=g).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "fine_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)]}))


def bench_paper(dev, quick: bool) -> dict:
    """[7] The paper's scale: ResNet-18 (its last two BN layers generated) on CIFAR-100-shaped data, all three
    stages in this process: collect (a few epochs, K = 200), fit (pdiff's defaults), sample -n 200. The images
    are random (nothing downloads here), so accuracies mean nothing; the files' md5 check is skipped for them in
    this process only. Images/second per stage, and for training the share of the GPU's bf16 peak (FLOPs of one
    step counted by torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.datasets import CIFAR100, cifar

    n_train, n_test, epochs, k, n = (2048, 512, 1, 8, 16) if quick else (50_000, 10_000, 3, 200, 200)
    root = Path(tempfile.mkdtemp(prefix="pdiff-bench-cifar-"))
    write_cifar100(root, n_train, n_test)
    CIFAR100._check_integrity, cifar.check_integrity = (lambda self: True), (lambda *a, **k: True)
    d = pdiff.load_data("cifar100", str(root)).to(dev)
    cfg = pdiff.CollectConfig(arch="resnet18", data="cifar100", epochs=epochs, k=k, batch_size=128,
                              checkpoint_every=10**9)
    net, prep, layout, _ = pdiff.collect_network(cfg, d, dev, weights=False)
    err.print(f"[7] paper scale: resnet18 on CIFAR-100-shaped data ({n_train:,} + {n_test:,} random images), "
              f"{epochs} epochs, K={k}, n={n}, {dev}")
    with FlopCounterMode(display=False) as fc:  # one training step of one batch
        with pdiff.autocast(dev):
            torch.nn.functional.cross_entropy(net(prep(d.x_train[:128])), d.y_train[:128]).backward()
    net.zero_grad(set_to_none=True)
    t_train, _, _ = timed(lambda: pdiff.train_network(cfg, d, net, prep, pdiff.Loop()), dev)
    t_snap, _, snaps = timed(lambda: pdiff.collect_snapshots(cfg, d, net, prep, layout, pdiff.Loop()), dev)
    t_eval, _, correct = timed(lambda: pdiff.evaluate(net, prep, layout, snaps, d.x_test, d.y_test), dev)
    fit_cfg = pdiff.FitConfig(**({"ae_steps": 50, "denoiser_steps": 50} if quick else {}))
    collection = pdiff.Collection("snapshots", 1, k)
    split = pdiff.holdout(collection, k, fit_cfg.holdout)
    t_fit, _, model = timed(lambda: pdiff.fit(fit_cfg, snaps, split.training, layout, device=dev), dev)
    val_correct = pdiff.evaluate(net, prep, layout, snaps, d.x_val, d.y_val)  # no validation split here: (k, 0)
    run = pdiff.Run(root, cfg, net, prep, layout, snaps, correct, val_correct, d, {}, collection, split,
                    model=model.to(dev), fit_config=fit_cfg)
    t_sample, _, s = timed(lambda: pdiff.sample(pdiff.SampleConfig(n=n, sampler="ddim"), run), dev)
    steps = epochs * (n_train // 128)
    flops = fc.get_total_flops() * steps / t_train
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    peak = next((v for key, v in PEAK_BF16.items() if key in gpu), None)
    shutil.rmtree(root)
    res = {"n_train": n_train, "n_test": n_test, "epochs": epochs, "k": k, "n": n, "train_s": t_train,
           "train_images_per_s": epochs * n_train / t_train, "snapshot_s": t_snap, "snapshot_images_per_s": k * 128 / t_snap,
           "evaluate_s": t_eval, "evaluate_images_per_s": k * n_test / t_eval, "fit_s": t_fit, "sample_s": t_sample,
           "sample_evaluated_images_per_s": evaluated_sets(s.report) * n_test / s.report["seconds"]["evaluate"],
           "train_flops_per_s": flops, "gpu": gpu, "share_of_bf16_peak": flops / peak if peak else None}
    err.print(f"    train {res['train_images_per_s']:.0f} img/s, snapshots {res['snapshot_images_per_s']:.0f} img/s, "
              f"fit {t_fit:.0f} s, sample {t_sample:.1f} s" + (f", {res['share_of_bf16_peak']:.1%} of bf16 peak" if peak else ""))
    return res


def evaluated_sets(report: dict) -> int:  # parameter sets one sample run evaluated: generated, decoded, baselines
    return report["generated"]["count"] + report["decoded"]["count"] + sum(b["count"] for b in report["baselines"].values())


# ---------------------------------------------------------------------------------------------------- main


BEFORE = "fa7590e"  # pdiff just before fit worked in the span of the training originals (its AE: D wide)
SIZES = {"3.5k": ["--arch", "mlp3", "--width", "32"], "26k": ["--arch", "mlp3", "--width", "128"],
         "300k": ["--arch", "mlp3", "--width", "512"], "11.2M": ["--arch", "resnet18", "--params", "all"]}


def pdiff_before(root: Path) -> Path:
    """pdiff.py as it was at BEFORE, from this checkout's git history (fit's cost then grew with D)."""
    path = root / "pdiff_before.py"
    path.write_bytes(subprocess.run(["git", "-C", str(HERE), "show", f"{BEFORE}:pdiff.py"], capture_output=True,
                                    check=True).stdout)
    return path


def measured(script: Path, args: list, limit: float) -> dict:
    """Run `python SCRIPT ARGS --json` in a fresh process: wall seconds, its peak resident memory, its JSON; or
    how far it got when it ran past `limit` seconds (None)."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\ntry: runpy.run_path(sys.argv[0], run_name='__main__')"
            "\nexcept SystemExit as e: code = e.code\nelse: code = 0\n"
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code, file=sys.stderr)")
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, str(script), *map(str, args), "--json"], capture_output=True,
                           text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "limit": limit, "peak_gb": None}
    lines = [x for x in p.stderr.splitlines() if x.startswith("maxrss")]
    if not lines:  # killed (the kernel's out-of-memory killer leaves no word)
        return {"seconds": None, "limit": limit, "peak_gb": None, "failed": f"killed (exit {p.returncode})"}
    line = lines[-1].split()
    if line[2] != "0":
        raise SystemExit(f"bench: {script.name} {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - t, "peak_gb": int(line[1]) / 2**20, "json": json.loads(p.stdout)}


def bench_fit_d(quick: bool, limit: float, sizes: Optional[list] = None) -> dict:
    """[8] fit's time and peak memory against D, K = 100 snapshots (2 epochs, then stage 2), beside BEFORE's."""
    out, sizes = {}, sizes or (list(SIZES)[:2] if quick else list(SIZES))
    with tempfile.TemporaryDirectory() as tmp:
        before, new = pdiff_before(Path(tmp)), HERE / "pdiff.py"
        for size in sizes:
            run, k = Path(tmp) / size, 20 if quick else 100
            c = measured(new, ["collect", "--run", run, *SIZES[size], "-k", k, "--epochs", 2], 3600)
            f = measured(new, ["fit", "--run", run], 3600)
            b = measured(before, ["fit", "--run", run, "--name", "before"], min(limit, 3600))
            s = measured(new, ["sample", "--run", run, "-n", 20], 3600)
            out[size] = {"D": c["json"]["params"], "K": k, "collect_s": c["seconds"], "collect_gb": c["peak_gb"],
                         "fit_s": f["seconds"], "fit_gb": f["peak_gb"], "before_fit_s": b["seconds"],
                         "before_fit_gb": b["peak_gb"], "before_limit_s": b.get("limit"),
                         "before_failed": b.get("failed"), "sample_s": s["seconds"],
                         "sample_gb": s["peak_gb"], "generated_median": s["json"]["generated"]["median"],
                         "verdict": s["json"]["verdict"]["label"]}
            shutil.rmtree(run)
            err.print(f"    {size}: collect {c['seconds']:.0f} s {c['peak_gb']:.2f} GB; fit {f['seconds']:.0f} s "
                      f"{f['peak_gb']:.2f} GB; sample {s['seconds']:.0f} s {s['peak_gb']:.2f} GB (generated median "
                      f"{out[size]['generated_median']}, {out[size]['verdict']}); before " +
                      (f"{b['seconds']:.0f} s {b['peak_gb']:.2f} GB" if b["seconds"] else b.get("failed") or
                       f"> {limit:.0f} s"))
    return out


def bench_fit_quality(quick: bool) -> dict:
    """[9] the generated networks with fit in the span (now) and BEFORE: the quick start and 200 aligned seeds,
    generated median (DDPM, n = 50) over sample seeds 0, 1, 2."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        before, new = pdiff_before(Path(tmp)), HERE / "pdiff.py"
        for name, args in (("quick start", []), ("200 seeds", ["--networks", 50 if quick else 200])):
            run = Path(tmp) / name.replace(" ", "-")
            measured(new, ["collect", "--run", run, *args], 3600)
            fit = (["--ae-steps", 100, "--denoiser-steps", 100] if quick else [])
            f = {"now": measured(new, ["fit", "--run", run, *fit], 3600),
                 "before": measured(before, ["fit", "--run", run, "--name", "before", *fit], 3600)}
            row = {f"{who}_fit_s": f[who]["seconds"] for who in f}
            for who, script, model in (("now", new, "default"), ("before", before, "before")):
                meds = [measured(script, ["sample", "--run", run, "--model", model, "--seed", s], 3600)["json"][
                    "generated"]["median"] for s in range(3)]
                row |= {f"{who}_medians": meds, f"{who}_median": statistics.median(meds)}
            out[name] = row
            err.print(f"    {name}: generated median now {row['now_medians']}, before {row['before_medians']}")
    return out


def write_digits_as_mnist(root: Path):
    """scikit-learn's digits (pdiff's split) in torchvision's MNIST files (IDX), 8x8 images scaled to 0-255."""
    import struct
    d = pdiff.load_data("digits", str(root), False)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", d.x_train, d.y_train), ("t10k", d.x_test, d.y_test)):
        x = x.reshape(len(x), 8, 8).to(torch.uint8)
        for name, a in ((f"{split}-images-idx3-ubyte", x), (f"{split}-labels-idx1-ubyte", y.to(torch.uint8))):
            (raw / name).write_bytes(struct.pack(">I", 0x0800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
                                     + a.numpy().tobytes())


def bench_whole_cnn(quick: bool, limit: float) -> dict:
    """[11] the whole-CNN job the reference code takes 4,722 s for: convnet3 on the digits in MNIST's files,
    collect, fit, sample -n 20 at defaults, end to end (Python's start included), now and with BEFORE's fit and
    sample on the same collection."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, before, new = Path(tmp), pdiff_before(Path(tmp)), HERE / "pdiff.py"
        write_digits_as_mnist(root / "data")
        run = root / "run"
        net = ["--arch", "convnet3", "--data", "mnist", "--data-dir", root / "data"] + (["--epochs", 2, "-k", 20]
                                                                                         if quick else [])
        c = measured(new, ["collect", "--run", run, *net], 3600)
        for who, script, model in (("now", new, "default"), ("before", before, "before")):
            f = measured(script, ["fit", "--run", run, "--name", model], limit)
            s = measured(script, ["sample", "--run", run, "--model", model, "-n", 20], 3600) if f["seconds"] else {}
            out[who] = {"collect_s": c["seconds"], "fit_s": f["seconds"], "sample_s": s.get("seconds"),
                        "total_s": c["seconds"] + f["seconds"] + s["seconds"] if s else None, "D": c["json"]["params"],
                        "generated_median": s["json"]["generated"]["median"] if s else None,
                        "originals_median": c["json"]["snapshots"]["median"],
                        "verdict": s["json"]["verdict"]["label"] if s else None}
            err.print(f"    whole CNN {who}: collect {c['seconds']:.0f} s, fit {f['seconds'] or 0:.0f} s, "
                      f"sample {s.get('seconds') or 0:.0f} s")
    return out


def bench_paper_cost(dev: torch.device, quick: bool) -> dict:
    """[10] p-diff's own generator (fit --generator v3): seconds per training step (batch
    50, the v3 settings) at D = 2k / 26k, float32 beside bf16 autocast (what it trains in); at D = 11.2M the
    autoencoder's size (its Linear layers to and from the latent grow with D) and the memory AdamW needs for it."""
    out = {}

    def step_s(module, batch_fn, loss_fn, bf16: bool, steps: int) -> float:
        opt, times = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=0.0), []
        for _ in range(steps):
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(batch_fn())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(dev)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:] if len(times) > 1 else times)

    for D in ([2048] if quick else [2048, 26122]):
        ae = pdiff.ConvAE(D).to(dev).train()
        ae_loss = lambda x: F.mse_loss(ae.decode_padded(ae.encode_padded(x)).float(), x)
        fp32, bf16 = (step_s(ae, lambda: torch.randn(50, ae.L, device=dev), ae_loss, b, 2 if quick else 4)
                      for b in (False, True))
        out[f"ae_{D}"] = {"D": D, "params": sum(p.numel() for p in ae.parameters()), "fp32_s": fp32, "bf16_s": bf16,
                          "fp32_over_bf16": fp32 / bf16}
        err.print(f"    ConvAE D={D}: {fp32:.2f} s/step float32, {bf16:.2f} s bf16")
    dn, diff = pdiff.ConvDenoiser(128).to(dev).train(), pdiff.Diffusion().to(dev)
    dn_loss = lambda z: diff.loss(dn, z, torch.Generator().manual_seed(0))
    fp32, bf16 = (step_s(dn, lambda: torch.randn(50, 128, device=dev), dn_loss, b, 2 if quick else 4) for b in (False, True))
    out["denoiser"] = {"fp32_s": fp32, "bf16_s": bf16, "fp32_over_bf16": fp32 / bf16}
    err.print(f"    ConvDenoiser: {fp32:.2f} s/step float32, {bf16:.2f} s bf16")
    with torch.device("meta"):  # D = 11.2M (a whole resnet18): counted, not allocated
        n = sum(p.numel() for p in pdiff.ConvAE(11_172_810).parameters())
    out["ae_11.2M"] = {"params": n, "adamw_state_gb": 16 * n / 2**30}  # weights, gradients, two moments in float32
    err.print(f"    ConvAE D=11.2M: {n / 1e9:.2f} billion parameters, {16 * n / 2**30:.0f} GB to train with AdamW")
    return out


def report_table(r: dict) -> Table:
    tb = Table(title=f"pdiff benchmark: {r['hardware']['cpu']}, {r['hardware']['threads']} threads, "
                     f"torch {r['hardware']['torch']}, {r['hardware']['device']}", title_justify="left")
    for c, j in (("measurement", "left"), ("value", "right"), ("goal", "right"), ("", "left")):
        tb.add_column(c, justify=j)
    ok = lambda good: "[green]ok[/green]" if good else "[red]MISSED[/red]"
    if e := r.get("evaluate"):
        n = f"n={e['n_sets']}, {e['n_test']} imgs"
        tb.add_row(f"evaluate batched ({n})", f"{e['batched_s']:.2f} s", "", "")
        tb.add_row(f"evaluate loop ({n})", f"{e['loop_s']:.2f} s", "", "")
        tb.add_row(f"floor: front {e['front_s']:.3f} s + {e['n_sets']} x tail {e['tail_one_set_s']:.4f} s", f"{e['floor_s']:.2f} s", "", "")
        tb.add_row("batched / floor", f"{e['batched_over_floor']:.2f}x", "<= 1.25", ok(e["batched_over_floor"] <= 1.25))
        tb.add_row(f"batched / tight floor ({e['tight_floor_s']:.2f} s: shared conv {e['shared_conv_s']:.3f} s once)",
                   f"{e['batched_over_tight_floor']:.2f}x", "", "")
        tb.add_row("loop / batched", f"{e['loop_over_batched']:.1f}x", ">= 9", ok(e["loop_over_batched"] >= 9))
        tb.add_row("batched mask == loop mask", str(e["masks_identical"]), "True", ok(e["masks_identical"]), end_section=True)
    if q := r.get("quickstart"):
        for s in ("ddpm", "ddim"):
            d = q["samplers"][s]
            g = d["generated"]
            tb.add_row(f"{s} ({d['steps']} steps) generate n=50: CLI (cold) / warm median",
                       f"{d['seconds']['generate']:.2f} / {q['warm_generate_s'][s]:.2f} s", "", "")
            tb.add_row(f"{s} accuracy best/mean/median/min", f"{g['best']:.1f}/{g['mean']:.1f}/{g['median']:.1f}/{g['min']:.1f} %", "", "")
        o = q["original"]
        tb.add_row("originals best/mean/median/min", f"{o['best']:.1f}/{o['mean']:.1f}/{o['median']:.1f}/{o['min']:.1f} %", "", "")
        tb.add_row("ddpm / ddim generate, CLI (cold)", f"{q['ddpm_over_ddim_generate']:.1f}x", "", "")
        tb.add_row("ddpm / ddim generate, warm", f"{q['ddpm_over_ddim_warm']:.1f}x", ">= 15", ok(q["ddpm_over_ddim_warm"] >= 15), end_section=True)
        for s, w in q["wall_s"].items():
            tb.add_row(f"quick start wall: {s}", f"{w:.1f} s", "", "")
        tb.add_row("quick start wall: total", f"{sum(q['wall_s'].values()):.1f} s", "", "", end_section=True)
    if c := r.get("collect"):
        for p in ("shortcut", "naive"):
            tb.add_row(f"collect stage 2 {p} (k={c['k']})", f"{c[p]['per_snapshot_s']:.3f} s/snap", "", "")
        tb.add_row("naive / shortcut", f"{c['naive_over_shortcut']:.1f}x", "", "")
        tb.add_row("final eval of K snapshots (excluded)", f"{c['shortcut']['eval_s']:.3f} s", "", "")
        tb.add_row("snapshots shortcut vs naive, max |diff|", f"{c['snapshots_max_abs_diff']:.1e}", "", "")
    if s := r.get("seeds"):
        tb.add_row(f"{s['n']} mlp3 networks, {s['epochs']} epochs: together / one after another",
                   f"{s['together_s']:.1f} / {s['alone_s']:.1f} s", "", "")
        tb.add_row("one after another / together", f"{s['alone_over_together']:.1f}x", "", "", end_section=True)
    if pp := r.get("paper"):
        for what in ("train", "snapshot", "evaluate"):
            tb.add_row(f"paper scale: {what} images/s", f"{pp[what + '_images_per_s']:,.0f}", "", "")
        tb.add_row(f"paper scale: fit / sample -n {pp['n']} (s)", f"{pp['fit_s']:.0f} / {pp['sample_s']:.1f}", "", "")
        share = pp["share_of_bf16_peak"]
        tb.add_row("paper scale: training FLOP/s, share of bf16 peak",
                   f"{pp['train_flops_per_s'] / 1e12:.1f} T" + (f", {share:.1%}" if share else ""), "", "", end_section=True)
    if t := r.get("torchrun"):
        for stage, what in (("collect", f"collect --networks {t['n_seeds']} (total)"), ("sample", "sample -n 200 (evaluate)")):
            tb.add_row(f"{what}: 1 process / 2 processes", f"{t[stage + '_1']['seconds']:.2f} / {t[stage + '_2']['seconds']:.2f} s",
                       "", "")
            tb.add_row(f"  speed-up with 2 processes", f"{t[stage + '_1_over_2']:.2f}x", "", "")
    for size, f in r.get("fit_d", {}).items():
        before = f"{f['before_fit_s']:.0f} s, {f['before_fit_gb']:.2f} GB" if f["before_fit_s"] else \
            f.get("before_failed") or f"> {f['before_limit_s']:.0f} s"
        tb.add_row(f"fit D={f['D']:,} K={f['K']}: now / before", f"{f['fit_s']:.0f} s, {f['fit_gb']:.2f} GB / {before}",
                   "< 300 s, < 8 GB" if size == "11.2M" else "", "")
        tb.add_row(f"  collect / sample -n 20 (generated median, verdict)", f"{f['collect_s']:.0f} / {f['sample_s']:.0f} s "
                   f"({f['generated_median']:.2f}, {f['verdict']})", "sample < 120 s" if size == "11.2M" else "", "")
    for name, q in r.get("fit_quality", {}).items():
        tb.add_row(f"{name}: generated median, sample seeds 0/1/2: now / before",
                   f"{'/'.join(f'{m:.2f}' for m in q['now_medians'])} / {'/'.join(f'{m:.2f}' for m in q['before_medians'])}",
                   "within 0.3", ok(abs(q["now_median"] - q["before_median"]) <= 0.3 or q["now_median"] > q["before_median"]))
    for who, w in r.get("whole_cnn", {}).items():
        tb.add_row(f"whole CNN (convnet3, D={w['D']:,}, MNIST files) {who}: collect / fit / sample -n 20",
                   f"{w['collect_s']:.0f} / {w['fit_s'] or 0:.0f} / {w['sample_s'] or 0:.0f} s", "", "")
        tb.add_row(f"  end to end (generated median, verdict)", f"{w['total_s'] or 0:.0f} s ({w['generated_median']}, "
                   f"{w['verdict']})", "< 236 s" if who == "now" else "", "")
    for name, c in r.get("paper_cost", {}).items():
        if "error" in c:
            tb.add_row(f"p-diff's {name}", c["error"][:60], "", "")
        elif "fp32_s" in c:
            tb.add_row(f"p-diff's {name} step (batch 50): float32 / bf16", f"{c['fp32_s']:.2f} / {c['bf16_s']:.2f} s = "
                       f"{c['fp32_over_bf16']:.1f}x", "", "")
        else:
            tb.add_row(f"p-diff's {name}: parameters, AdamW memory", f"{c['params'] / 1e9:.2f} G, "
                       f"{c['adamw_state_gb']:.0f} GB", "", "")
    for name, share in r.get("foreign_cpu_share", {}).items():
        tb.add_row(f"CPU taken by other processes during {name}", "n/a" if share is None else f"{share:.0%}", "0%",
                   "" if share is None else "[green]ok[/green]" if share < 0.05 else "[yellow]timings inflated[/yellow]")
    tb.add_row("benchmark wall", f"{r['seconds']:.0f} s", "", "")
    return tb


PARTS = ("evaluate", "quickstart", "collect", "seeds", "torchrun", "fit-d", "fit-quality", "whole-cnn", "paper-cost", "paper")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, shorter fit")
    ap.add_argument("--json", type=Path, help="write the JSON here instead of stdout")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (also passed to the pdiff CLI)")
    ap.add_argument("--n-test", type=int, help="test images for [1] (default 48; 16 with --quick)")
    ap.add_argument("--repeat", type=int, help="timings per median (default 3; 1 with --quick)")
    ap.add_argument("--only", default=",".join(PARTS[:5]), help=f"comma-separated subset of {','.join(PARTS)} "
                    "(fit-d: fit against D up to a whole resnet18, ~15 min; fit-quality: ~20 min)")
    ap.add_argument("--before-limit", type=float, default=900, help="seconds fit-d lets the earlier fit run per D")
    ap.add_argument("--sizes", help=f"fit-d: comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--scale", choices=("small", "paper"), default="small",
                    help="paper: also [7], ResNet-18 on CIFAR-100-shaped data, all three stages (a GPU)")
    ap.add_argument("--keep", action="store_true", help="keep the quick start's temporary run folder")
    ap.add_argument("--threads", type=int, help="torch threads here and OMP_NUM_THREADS of the pdiff subprocesses")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    dev = pdiff.pick_device(a.device)
    only = set(a.only.split(",")) | ({"paper"} if a.scale == "paper" else set())
    if not only <= set(PARTS):
        ap.error(f"--only: unknown part(s) {', '.join(sorted(only - set(PARTS)))}")
    repeat = a.repeat or (1 if a.quick else 3)
    t0 = time.perf_counter()
    r = {"quick": a.quick, "hardware": hardware(dev), "loadavg_before": os.getloadavg()}
    if "evaluate" in only:
        with section(r, "evaluate"):
            r["evaluate"] = bench_evaluate(dev, a.n_test or (16 if a.quick else 48), 64, repeat)
    if "quickstart" in only:
        with section(r, "quickstart"):
            r["quickstart"] = bench_quickstart(a.device, a.quick, a.keep, repeat)
    if "collect" in only:
        with section(r, "collect"):
            r["collect"] = bench_collect(dev, k=4 if a.quick else 8)
    if "seeds" in only:
        with section(r, "seeds"):
            r["seeds"] = bench_seeds(dev, 50 if a.quick else 200, 30)
    if "torchrun" in only:
        with section(r, "torchrun"):
            r["torchrun"] = bench_torchrun(a.quick)
    if "fit-d" in only:
        with section(r, "fit-d"):
            r["fit_d"] = bench_fit_d(a.quick, a.before_limit, a.sizes.split(",") if a.sizes else None)
    if "fit-quality" in only:
        with section(r, "fit-quality"):
            r["fit_quality"] = bench_fit_quality(a.quick)
    if "whole-cnn" in only:
        with section(r, "whole-cnn"):
            r["whole_cnn"] = bench_whole_cnn(a.quick, a.before_limit)
    if "paper-cost" in only:
        with section(r, "paper-cost"):
            r["paper_cost"] = bench_paper_cost(dev, a.quick)
    if "paper" in only:
        with section(r, "paper"):
            r["paper"] = bench_paper(dev, a.quick)
    r["loadavg_after"], r["seconds"] = os.getloadavg(), time.perf_counter() - t0
    e, q = r.get("evaluate"), r.get("quickstart")
    r["goals_met"] = {**({"batched_over_floor <= 1.25": e["batched_over_floor"] <= 1.25,
                          "loop_over_batched >= 9": e["loop_over_batched"] >= 9, "masks_identical": e["masks_identical"]} if e else {}),
                      **({"ddpm_over_ddim_warm >= 15": q["ddpm_over_ddim_warm"] >= 15} if q else {})}
    err.print(report_table(r))
    if max((s for s in r.get("foreign_cpu_share", {}).values() if s is not None), default=0) >= 0.05:
        err.print("[yellow]other processes used the CPUs during the run: its timings are inflated (torch's threads wait "
                  "on each other when a core is taken); rerun on an idle machine[/yellow]")
    doc = json.dumps(r, indent=2)
    a.json.write_text(doc + "\n") if a.json else print(doc)
    if "evaluate" in r and not r["evaluate"]["masks_identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
