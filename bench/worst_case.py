"""What the worst case over attacks costs on the embedded demo CLIP: cascade against
--independent, and batched against one-at-a-time EOT-PGD, in one run.

    python -m bench.worst_case --n 50 --rounds 2 --out bench/results/worst_case

1. The worst-case command of docs/worst_case.md (`atpt eval --attack worst`) on the first
   N shipped images, in cascade (the default) and with --independent, each round both
   modes in alternating order (interleaved, so drifting load hits both alike), each run in
   a fresh folder: wall time per attack (the attack's run, clean pass apart) and in all,
   and whether both modes give the same per-sample worst case.
2. EOT-PGD on one adapter through `adaptive.run_adaptive_each`, `--batch` images per call
   (the adapter's `image_batch` set to match) against one image per call, interleaved:
   images per second, and whether the adversarial images agree.
Writes <out>.json (every measurement, the command, versions, threads) and <out>.md, and
prints the tables. Time only on a quiet machine; report ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ATTACKS = "pgd[steps=20],eot-pgd[steps=10,eot_iter=2],apgd-eot[steps=10,eot_iter=2],square[n_queries=100]"
ADAPTERS = "zeroshot,ens,tpt,rtpt,atpt_official,atpt"


def worst_case_run(args, out: Path, independent: bool) -> dict:
    """One worst-case command in a fresh folder: its summary, total seconds and per-sample outcomes."""
    from atpt_plugin.adapters import cli

    command = ["eval", "--model", "fmnist-vit-tiny", "--adapters", args.adapters, "--attack", "worst"]
    command += ["--attacks", args.attacks, "--eps", str(args.eps), "--n-examples", str(args.n)]
    command += ["--sanity-checks", str(args.checks), "--attack-batch-size", str(args.batch), "--no-progress"]
    command += ["--out", str(out), "--cache-dir", str(out / "cache")] + (["--independent"] if independent else [])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if cli.main(command) != 0:
            raise RuntimeError(f"atpt {' '.join(command)} failed")
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "worst_case_samples.jsonl").read_text().splitlines()
    outcome = {f"{s['adapter']}:{s['position']}": s["worst_case_correct"] for s in map(json.loads, lines)}
    return {
        "command": ["atpt", *command],
        "seconds": seconds,
        "attack_seconds": summary["attack_wall_seconds"],
        "worst_case": {row["adapter"]: row["worst_case_acc"] for row in summary["rows"]},
        "attacked": {
            row["adapter"]: {k: v["attacked"] for k, v in row["attack_stats"].items()} for row in summary["rows"]
        },
        "outcome": outcome,
    }


def eot_pgd_throughput(args, model, tokenizer, classnames, x, y, batch: int) -> dict:
    """Images per second of EOT-PGD on one adapter, `batch` images per call."""
    from atpt_plugin.adapters.adaptive import run_adaptive_each
    from atpt_plugin.adapters.attacks import AttackStats, chunk_seed, make_attack

    from atpt_plugin import load_adapter

    adapter = load_adapter(args.eot_adapter, image_batch=batch).wrap(model, classnames=classnames, tokenizer=tokenizer)
    spec = make_attack("eot-pgd", eps=args.eps / 255, steps=args.eot_steps, eot_iter=args.eot_iter)
    adversarial = []
    start = time.perf_counter()
    for first in range(0, len(x), batch):
        part = slice(first, first + batch)
        seeds = [chunk_seed(0, p) for p in range(first, min(first + batch, len(x)))]
        stats = [AttackStats() for _ in seeds]
        adversarial.append(run_adaptive_each(spec, adapter, x[part], y[part], seeds, stats))
    seconds = time.perf_counter() - start
    return {"batch": batch, "seconds": seconds, "images_per_second": len(x) / seconds, "images": torch.cat(adversarial)}


def tables(result: dict) -> str:
    modes = result["worst_case"]
    labels = list(modes["cascade"][0]["attack_seconds"])
    head = "| mode | round | " + " | ".join(f"{label} (s)" for label in labels) + " | total (s) |"
    lines = [f"Worst case on {result['args']['n']} demo images, {result['args']['threads']} thread(s)", "", head]
    lines.append("|---|---:|" + "---:|" * (len(labels) + 1))
    for mode, runs in modes.items():
        for i, run in enumerate(runs):
            cells = [f"{run['attack_seconds'][label]:.1f}" for label in labels]
            lines.append(f"| {mode} | {i + 1} | " + " | ".join(cells) + f" | {run['seconds']:.1f} |")
    total = {mode: sum(r["seconds"] for r in runs) for mode, runs in modes.items()}
    lines += [
        "",
        f"independent / cascade total time: {total['independent'] / total['cascade']:.2f}x; "
        f"same per-sample worst case: {result['same_worst_case']}",
        "",
    ]
    lines += ["EOT-PGD images/s", "", "| images per call | round | images/s |", "|---:|---:|---:|"]
    for run in result["eot_pgd"]:
        lines.append(f"| {run['batch']} | {run['round']} | {run['images_per_second']:.3f} |")
    lines += ["", f"adversarial images agree (max abs difference): {result['eot_pgd_max_difference']:.2e}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="shipped test images")
    parser.add_argument("--adapters", default=ADAPTERS)
    parser.add_argument("--attacks", default=ATTACKS, help="the worst case's attacks, cheapest first")
    parser.add_argument("--eps", type=float, default=4.0, help="L-inf budget in 1/255 units")
    parser.add_argument("--checks", type=int, default=4, help="sanity checks on the first N images")
    parser.add_argument("--batch", type=int, default=8, help="--attack-batch-size, and images per batched EOT-PGD call")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of each measurement")
    parser.add_argument("--eot-adapter", default="atpt")
    parser.add_argument("--eot-n", type=int, default=16, help="images of the EOT-PGD throughput measurement")
    parser.add_argument("--eot-steps", type=int, default=10)
    parser.add_argument("--eot-iter", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/worst_case")
    args = parser.parse_args(argv)

    from atpt_plugin.demo_model import load_demo_model, load_demo_subset

    torch.set_num_threads(args.threads)
    modes = {"cascade": [], "independent": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = ["cascade", "independent"] if round_ % 2 == 0 else ["independent", "cascade"]
            for mode in order:
                run = worst_case_run(args, Path(scratch) / f"{mode}-{round_}", mode == "independent")
                modes[mode].append(run)
                print(f"round {round_ + 1} {mode}: {run['seconds']:.1f} s", file=sys.stderr, flush=True)
    same = all(run["outcome"] == modes["cascade"][0]["outcome"] for runs in modes.values() for run in runs)

    model, tokenizer, classnames = load_demo_model()
    x, y = load_demo_subset(args.eot_n)
    eot, images = [], {}
    for round_ in range(args.rounds):
        for batch in [args.batch, 1] if round_ % 2 == 0 else [1, args.batch]:
            run = eot_pgd_throughput(args, model, tokenizer, classnames, x, y, batch)
            images[batch] = run.pop("images")
            eot.append({**run, "round": round_ + 1})
    difference = float((images[args.batch] - images[1]).abs().max())
    result = {
        "command": [sys.executable, "-m", "bench.worst_case", *(argv if argv is not None else sys.argv[1:])],
        "args": vars(args),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": platform.processor() or platform.machine(),
        "worst_case": modes,
        "same_worst_case": same,
        "eot_pgd": eot,
        "eot_pgd_max_difference": difference,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = tables(result)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(text)
    print(text)
    print(f"wrote {out}.json, {out}.md", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
