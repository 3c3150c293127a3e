"""The `atpt` command: `atpt eval ...` runs adapters under an attack on a test set; `atpt verify
OUT` recomputes a sample of a results folder's records; `atpt leaderboard RUN_DIR...` merges
runs into one leaderboard; `atpt list`.

    atpt eval --model ViT-B-16 --pretrained openai --dataset pets --data-root DATA \\
              --adapters atpt,rtpt,tpt --attack pgd --eps 4 --steps 100 --n-examples 1000 --out results/pets

Output folder: run.json (the run's manifest), samples.jsonl (one line per sample and
adapter, appended as they finish; samples.rank<r>.jsonl for other ranks), summary.json,
results.md, results.csv, results.png, model_info/<dataset>/<threat>/<name>.json
(RobustBench's leaderboard format). Starting the same command again resumes; a different
command into the same folder is refused. `--nproc N` (or torchrun) shards the samples over
N processes. See `atpt eval --help` for the units of --eps.

Faults end in one `atpt: error:` line, never a traceback, and lose nothing finished: a
failed write (a full disk) exits 1 and the same command resumes once it is fixed; an
unreadable image, damaged results lines or bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Sequence

from .evaluate import run_eval
from .listing import run_list
from .models import DEMO_MODEL, PretrainedUnavailable

EPILOG_EVAL = """\
units: --eps and --alpha for L-inf attacks (pgd, fgsm, autoattack) are in 1/255 units:
  --eps 4 means 4/255 (the paper's protocol, as in the authors' code); '4/255' may be written
  out, and a bare value below 1 is refused as ambiguous. For L2 attacks (pgdl2, autoattack
  with --attack-opt norm=L2) they are L2 norms of [0,1] images (e.g. --eps 0.5). Defaults:
  the paper's protocol, eps 4/255 with 100 steps on ViTs, eps 1/255 with 1 step on ResNets,
  alpha = eps / 4.
adaptive attacks: --attack eot-pgd (PGD with EOT on each adapter's whole pipeline; --attack-steps,
  --alpha, --attack-opt eot_iter=4 gradient=bpda|exact|fixed_prompt loss=ce|margin),
  --attack apgd-eot (AutoAttack's APGD with EOT; loss=ce|dlr|dlr-targeted) and --attack
  square (gradient-free; --attack-opt n_queries=1000) attack every adapter itself, each
  image stopping at the first iterate that fools the deployed adapter, --attack-batch-size
  images at a time where the attack batches: they cost at most steps * eot_iter (or
  n_queries) adaptations per image and adapter. --sanity-checks N (default 8, 0 = off)
  reruns cheaper variants, a large eps and the transfer PGD on the first N images and warns
  in results.md / summary.json when the attack fails a check (Carlini et al. 2019; Croce et
  al. 2022). --attack pgd is the paper's transfer attack, for comparison.
worst case: --attack worst --attacks "pgd[steps=20],eot-pgd,apgd-eot,square" predicts every
  sample clean once, then runs the attacks in the order given, as a cascade: each attack
  only on the samples clean and every earlier attack left robust (give them cheapest
  first); --independent runs every attack on every sample. docs/worst_case.md.
resume: the same command into the same --out continues where a killed run stopped; a run
  with other settings into that folder is refused (use a new --out). A full disk stops the
  run with an error naming the file; free space and rerun. Damaged lines in samples.jsonl
  stop it too (with their line numbers): --repair-results drops them and recomputes them.
  Every record is checksummed and checked against the run (label, position): one that
  fails is reported, never counts and is recomputed (docs/results_integrity.md);
  `atpt verify OUT` recomputes a sample of the records.
bad images: an image file that cannot be read or decoded stops the run, naming the file
  and the sample; --on-bad-image skip leaves such samples out of every count and lists
  them in summary.json ("skipped") and results.md. Damaged cache entries are recomputed.
processes: --nproc N starts N processes (torchrun); or run
  torchrun --nproc_per_node N -m atpt_plugin.adapters.cli eval ...
"""


BAD_IMAGE_ADVICE = (
    "\nReplace that file by a readable copy and run the same command again, or add --on-bad-image skip "
    "to leave unreadable images out (listed in summary.json and results.md); finished results are kept. "
    "Removing the file instead changes the dataset (its fingerprint), so the same --out would refuse the run."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atpt", description="Evaluate test-time adapters (A-TPT and baselines) on CLIP under adversarial attacks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser(
        "eval",
        help="run adapters on a test set, clean and under attack",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "--model",
        default=DEMO_MODEL,
        help="open_clip model name (ViT-B-16, RN50, ...), a model config .json, fmnist-vit-tiny "
        "(also 'demo'; the default): the embedded Fashion-MNIST CLIP, or hf:<Hugging Face id or "
        "local folder> (a transformers CLIPModel or SiglipModel, e.g. hf:openai/clip-vit-base-patch16)",
    )
    ev.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (openai), a local state-dict file, or 'none' for random init (default: "
        "the shipped weights for fmnist-vit-tiny, openai for other models)",
    )
    ev.add_argument(
        "--dataset",
        default="demo",
        help="dataset name (atpt list datasets; default: the shipped Fashion-MNIST demo subset)",
    )
    ev.add_argument(
        "--data-root",
        help="the folder holding the dataset folders (or the dataset folder); not needed for the demo subset",
    )
    ev.add_argument("--split", default="test", help="split of split-file datasets (default: test)")
    ev.add_argument(
        "--adapters",
        default="atpt",
        help="comma-separated adapters (atpt list adapters), each a name or a variant name[key=value,...], "
        'e.g. "atpt,atpt[aggregator=mean,views=32],rtpt"',
    )
    ev.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override an adapter setting for all adapters, e.g. --set views=32 (repeatable)",
    )
    ev.add_argument(
        "--no-dataset-settings",
        action="store_true",
        help="do not apply the dataset's domain word / ImageNet no-AugMix convention",
    )
    ev.add_argument(
        "--attack",
        default="pgd",
        help="attack name (atpt list attacks), optionally with parameters name[key=value,...] such as "
        '"pgd[steps=20]", none, or worst (with --attacks) (default: pgd)',
    )
    ev.add_argument(
        "--attacks",
        help="with --attack worst: the attacks whose worst case is reported, in the order they run "
        '(cheapest first), each with its own parameters, e.g. "pgd[steps=20],eot-pgd,square[n_queries=500]"',
    )
    ev.add_argument(
        "--independent",
        action="store_true",
        help="with --attack worst: run every attack on every sample (each attack's own accuracy) instead of "
        "the cascade, where each attack runs only on the samples every earlier attack left robust",
    )
    ev.add_argument("--eps", help="attack budget; L-inf in 1/255 units (4 = 4/255), see below")
    ev.add_argument("--alpha", help="step size, in the unit of --eps (default: eps / 4)")
    ev.add_argument(
        "--attack-steps",
        type=int,
        dest="steps",
        help="attack steps (default: 100 ViT, 1 ResNet for pgd); tuning steps are --set steps=N",
    )
    ev.add_argument("--steps", type=int, dest="deprecated_steps", help=argparse.SUPPRESS)
    ev.add_argument(
        "--attack-opt",
        action="append",
        metavar="KEY=VALUE",
        help="other attack parameters, e.g. random_start=false, c=1, version=standard, norm=L2",
    )
    ev.add_argument(
        "--sanity-checks",
        type=int,
        default=8,
        metavar="N",
        help="adaptive attacks: run the sanity checks on the first N images (default 8; 0: off)",
    )
    ev.add_argument("--n-examples", type=int, help="evaluate the first N of a seeded permutation (default: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the selection, the attack and the adapters")
    ev.add_argument("--out", required=True, help="output folder (resumable)")
    ev.add_argument("--cache-dir", help="adversarial image cache (default: $ATPT_CACHE or ~/.cache/atpt_plugin)")
    ev.add_argument("--attack-batch-size", type=int, default=32, help="images per attack batch (default: 32)")
    ev.add_argument(
        "--ece-bins",
        type=int,
        default=20,
        metavar="B",
        help="bins of the expected calibration error in the tables (default 20, as the C-TPT / O-TPT code)",
    )
    ev.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU if there is one, else cpu), cpu, cuda (cuda:LOCAL_RANK: each process its own GPU), cuda:N",
    )
    ev.add_argument("--nproc", type=int, default=1, help="processes to shard the samples over (uses torchrun)")
    ev.add_argument("--model-name", help="leaderboard name prefix (default: <model>-<pretrained>)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="an image file that cannot be read: stop with an error naming it (default), or skip the "
        "sample (left out of every count, listed in summary.json and results.md)",
    )
    ev.add_argument(
        "--repair-results",
        action="store_true",
        help="drop damaged lines of samples.jsonl (reported with their line numbers) and recompute them",
    )
    ex = commands.add_parser("explain", help="one picture of what an adapter does to one demo test image")
    ex.add_argument("index", type=int, help="index into the shipped demo subset (0..999)")
    st = commands.add_parser("stability", help="how much each explainer's maps move under the attack (demo subset)")
    st.add_argument("--n-examples", type=int, default=200, help="first N images of the demo subset (default 200)")
    for sub, out in ((ex, "explain.png"), (st, None)):
        sub.add_argument("--adapter", default="atpt", help="adapter whose views and weights are shown (default atpt)")
        sub.add_argument("--eps", default="4", help="PGD budget against zero-shot CLIP, in 1/255 (default 4)")
        sub.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", default=out, help=f"output file (default {out})")
    ve = commands.add_parser(
        "verify",
        help="recompute a seeded random sample of a results folder's records; exit 1 when one does not reproduce",
        description="Rebuild the run of an `atpt eval` --out folder from its run.json and recompute a seeded "
        "random sample of its finished records (attack and adapter, with the run's seeds and batches); each "
        "record that does not reproduce is listed with its file and line (docs/results_integrity.md).",
    )
    ve.add_argument("out", help="the --out folder of `atpt eval` (a worst-case folder: each attack's run)")
    ve.add_argument("--n", type=int, default=10, help="records to recompute per run folder (default 10)")
    ve.add_argument("--seed", type=int, default=0, help="seed of the random sample of records (default 0)")
    ve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    ve.add_argument("--data-root", help="where the run's dataset lives on this machine (default: as recorded)")
    lb = commands.add_parser(
        "leaderboard",
        help="merge the folders of `atpt eval` runs into one leaderboard (md, csv, json, html)",
        description="Merge finished or partial `atpt eval` runs (clean, transfer, adaptive, worst case) into one "
        "leaderboard: adapters as rows, datasets as columns, the average and the cost; runs that compare "
        "different things (backbone, eps, attacks, images) go into separate tables.",
    )
    lb.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of `atpt eval`, or folders holding them")
    lb.add_argument("--out", default="leaderboard", help="output folder (default: leaderboard)")
    ls = commands.add_parser(
        "list", help="list every registry: adapters, input defences, components, backbones, attacks, datasets"
    )
    ls.add_argument(
        "what",
        nargs="?",
        choices=[
            "adapters",
            "input_defences",
            "explainers",
            "augmenters",
            "aggregators",
            "objectives",
            "backbones",
            "attacks",
            "datasets",
        ],
    )
    return parser


def run_leaderboard(args) -> int:
    from pathlib import Path

    from .leaderboard_files import markdown, write_leaderboard
    from .merge import load_tables

    tables = load_tables(args.runs)
    files = write_leaderboard(tables, Path(args.out).expanduser())
    print(markdown(tables))
    print("wrote: " + ", ".join(map(str, files)), file=sys.stderr)
    return 0


def _relaunch(argv: List[str], nproc: int) -> int:
    """Run this command under torchrun with `nproc` processes (without --nproc)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "atpt_plugin.adapters.cli",
        *rest,
    ]
    return subprocess.call(command)


def _check_eval_extra() -> None:
    """The evaluation's own dependencies are an extra: say so instead of a ModuleNotFoundError."""
    import importlib.util

    missing = [name for name in ("torchattacks", "matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"atpt eval needs {', '.join(missing)}: install the evaluation extra, pip install 'atpt-plugin[eval]'"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .cache import CacheMismatchError
    from .datasets import BadImageError, DatasetLayoutError
    from .storage import StorageError

    try:
        if args.command == "leaderboard":
            return run_leaderboard(args)
        if args.command != "list":
            _check_eval_extra()
        if args.command == "list":
            return run_list(args)
        if args.command == "verify":
            from .verify import run_verify

            return run_verify(args)
        if args.command in ("explain", "stability"):
            from .explain import run_explain, run_stability

            return (run_explain if args.command == "explain" else run_stability)(args)
        if args.deprecated_steps is not None:
            if args.steps is not None:
                raise ValueError("--steps is the old name of --attack-steps: give only --attack-steps")
            print(
                "atpt: warning: --steps is deprecated (it meant attack steps, while --set steps= is tuning "
                "steps): use --attack-steps",
                file=sys.stderr,
            )
            args.steps = args.deprecated_steps
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return _relaunch(argv, args.nproc)
        return run_eval(args)
    except (
        ValueError,
        FileNotFoundError,
        PretrainedUnavailable,
        CacheMismatchError,
        DatasetLayoutError,
        BadImageError,
        StorageError,
    ) as error:
        if os.environ.get("ATPT_DEBUG"):
            raise
        advice = BAD_IMAGE_ADVICE if isinstance(error, BadImageError) else ""
        print(f"atpt: error: {error}{advice}", file=sys.stderr)
        return 1 if isinstance(error, StorageError) else 2


if __name__ == "__main__":
    sys.exit(main())
