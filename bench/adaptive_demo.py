"""Transfer versus adaptive attacks on the embedded demo CLIP (Fashion-MNIST), in one run.

    python -m bench.adaptive_demo --n 50 --out bench/results/adaptive_demo

For zeroshot, rtpt and atpt (their default settings) on the first N shipped test images:
the paper's transfer PGD (on zero-shot CLIP, eps 4/255, 100 steps) and the adaptive
EOT-PGD on each adapter's whole pipeline (default 20 steps x 4 EOT samples, BPDA through
the tuning step), with the sanity checks on the first --checks images. Writes <out>.json
(rows of both runs, the command, versions, threads) and <out>.md, and prints the table.
The per-sample results go to <out>-<attack>/ so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="shipped test images (n/10 per class)")
    parser.add_argument("--adapters", default="zeroshot,rtpt,atpt")
    parser.add_argument("--eps", type=float, default=4.0, help="L-inf budget in 1/255 units")
    parser.add_argument("--steps", type=int, default=20, help="eot-pgd steps")
    parser.add_argument("--eot-iter", type=int, default=4, help="eot-pgd samples per step")
    parser.add_argument("--gradient", default="bpda", choices=["bpda", "exact", "fixed_prompt"])
    parser.add_argument("--transfer-steps", type=int, default=100)
    parser.add_argument("--checks", type=int, default=8, help="sanity checks on the first N images (0: off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/adaptive_demo")
    args = parser.parse_args(argv)

    from atpt_plugin.adapters.report import markdown_table
    from atpt_plugin.adapters.robustbench import benchmark_table

    from atpt_plugin import load_adapter
    from atpt_plugin.demo_model import load_demo_model, load_demo_subset

    torch.set_num_threads(args.threads)
    model, tokenizer, classnames = load_demo_model()
    x, y = load_demo_subset(args.n)
    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for attack, params in (
        ("pgd", dict(steps=args.transfer_steps)),
        ("eot-pgd", dict(steps=args.steps, eot_iter=args.eot_iter, gradient=args.gradient)),
    ):
        adapters = {name: load_adapter(name).wrap(model, classnames=classnames, tokenizer=tokenizer) for name in names}
        start = time.perf_counter()
        rows = benchmark_table(
            adapters,
            dataset=(x, y),
            eps=args.eps / 255,
            attack=attack,
            tokenizer=tokenizer,
            log_path=f"{out}-{attack}",
            sanity_checks=args.checks if attack != "pgd" else 0,
            **params,
        )
        seconds = time.perf_counter() - start
        caption = (
            f"demo CLIP (Fashion-MNIST), {args.n} shipped test images, attack {attack} "
            f"eps {args.eps:g}/255, {args.threads} CPU thread(s), {seconds:.0f} s"
        )
        runs[attack] = {"rows": rows, "seconds": seconds, "caption": caption}
        print(markdown_table(rows, caption), flush=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    result = {
        "command": [sys.executable, "-m", "bench.adaptive_demo", *(argv or sys.argv[1:])],
        "args": vars(args),
        "versions": versions,
        "machine": platform.processor() or platform.machine(),
        "runs": runs,
    }
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text("\n".join(markdown_table(r["rows"], r["caption"]) for r in runs.values()))
    print(f"wrote {out}.json, {out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
