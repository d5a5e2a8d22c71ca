"""Re-measure what pdiff's docs quote: each part runs one experiment script (or the benchmark, or CI) and its
Markdown output is kept in docs/results/PART.md with the command, commit, date and machine that made it; then
docs/RESULTS.md and the README's marked blocks are rebuilt from those files, so no number is copied by hand.

    python experiments/results.py                 # every part (hours on 2 CPU cores; minutes on a GPU)
    python experiments/results.py quickstart ci   # some parts; the others keep their last output
    python experiments/results.py --assemble      # rebuild RESULTS.md and the README from the kept outputs
QUICK=1 runs each script's tiny version (the tests use it); SCALE=paper its paper-scale one (a GPU).
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
# part: (title, command, what it measures). Their order is RESULTS.md's.
PARTS = {
    "ci": ("Set-up and suite time", ["bash", ".ci/run"],
           "A fresh virtual environment, the README's set-up commands and its test command, timed by `.ci/run`."),
    "quickstart": ("The quick start", ["bash", "experiments/quickstart.sh"],
                   "`pdiff collect && pdiff fit && pdiff sample -n 50` at their defaults on the offline digits."),
    "calibrate-steps": ("How often the verdict is wrong: consecutive snapshots", [PY, "experiments/calibrate_verdict.py"],
                        "10 collections of the quick start's protocol (collect seeds 0, 1000, ...); groups whose "
                        "truth is known, judged against each collection's held-out blocks."),
    "calibrate-seeds": ("How often the verdict is wrong: whole networks from seeds",
                        [PY, "experiments/calibrate_verdict.py", "--seeds-protocol"],
                        "The same for `collect --networks 200`: held-out networks are whole networks."),
    "whole_model": ("Whole networks from many seeds (v1 Table 3)", ["bash", "experiments/whole_model.sh"],
                    "200 seeds, aligned and not: originals, decoded, generated, average, ensemble, verdict."),
    "ablate_generator": ("pdiff's generator beside p-diff's", ["bash", "experiments/ablate_generator.sh"],
                         "Every generator on the quick start's collection, the same held-out originals."),
    "ablate_k": ("How many snapshots (v1 Table 4a)", ["bash", "experiments/ablate_k.sh"], "K = 1, 10, 50, 200."),
    "ablate_noise": ("Noise augmentation (v1 Table 4b)", ["bash", "experiments/ablate_noise.sh"],
                     "None, input only, latent only, both."),
    "ablate_layers": ("Which layers (v1 Table 4c)", ["bash", "experiments/ablate_layers.sh"],
                      "The BatchNorm layers of one ResNet-18 block at three depths."),
    "table1": ("Data sets x architectures (Table 1)", ["bash", "experiments/table1.sh"], "Offline: digits only."),
    "target_accuracy": ("Generation at a target accuracy", ["bash", "experiments/target_accuracy.sh"],
                        "A conditioned model asked for validation accuracies, graded on the test set."),
    "bench": ("Speed", [PY, "experiments/bench_pdiff.py"], "Side-by-side timings and their ratios in one run."),
}


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def measure(part: str, docs: Path) -> None:
    """Run one part's command and keep its output, with where it came from, in docs/results/PART.md."""
    title, cmd, _ = PARTS[part]
    env = {**os.environ, "PDIFF": os.environ.get("PDIFF", f"{PY} {ROOT / 'pdiff.py'}")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"results: {part} failed ({' '.join(cmd)}, exit {r.returncode}): {r.stderr.strip()[-500:]}")
    out = r.stdout
    if part == "ci":  # its timing lines and pytest's last line
        lines = (r.stderr + r.stdout).splitlines()
        out = "\n".join(["```", *[ln for ln in lines if ln.startswith("ci: ") and " s: " in ln],
                         next(ln for ln in reversed(lines) if " passed" in ln), "```"]) + "\n"
    quick = " (QUICK=1)" if os.environ.get("QUICK") == "1" else ""
    made = (f"Made by `{' '.join(Path(c).name if c == PY else c for c in cmd)}`{quick} at commit {commit()} on "
            f"{datetime.date.today()} ({machine()}) in {time.perf_counter() - t0:.0f} s.")
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "results" / f"{part}.md").write_text(f"{made}\n\n{out.strip()}\n")


def assemble(docs: Path, readme: Path) -> None:
    """RESULTS.md from every kept part; the README's `<!-- results: PART -->` blocks from theirs."""
    parts = ["# pdiff: measured results\n",
             "Every table here is the output of the script named above it, kept in `docs/results/`; "
             "`python experiments/results.py PART` re-measures one part and rebuilds this file and the README's "
             "quoted blocks. Test accuracies in %, on the data set's test split. The neuron generator's study "
             "(whole networks that are new) is in `experiments/neurons.md`, made by `experiments/neurons.py`.\n"]
    for part, (title, _, what) in PARTS.items():
        f = docs / "results" / f"{part}.md"
        if f.is_file():
            parts.append(f"## {title}\n\n{what}\n\n{f.read_text().strip()}\n")
    (docs / "RESULTS.md").write_text("\n".join(parts))
    text = readme.read_text()
    block = re.compile(r"(<!-- results: (\S+) -->\n).*?(<!-- /results -->)", re.S)
    kept = lambda m: docs / "results" / f"{m[2]}.md"  # a part never measured keeps the README's text
    text = block.sub(lambda m: m[1] + kept(m).read_text() + m[3] if kept(m).is_file() else m[0], text)
    readme.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="*", help=f"parts to re-measure (default all): {', '.join(PARTS)}")
    ap.add_argument("--assemble", action="store_true", help="only rebuild RESULTS.md and the README")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where RESULTS.md and results/ live")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    a = ap.parse_args()
    unknown = set(a.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    for part in [] if a.assemble else a.parts or list(PARTS):
        print(f"results: {part} ...", file=sys.stderr, flush=True)
        measure(part, a.docs)
    assemble(a.docs, a.readme)


if __name__ == "__main__":
    main()
