"""The `atpt` command: `atpt eval ...` runs adapters under an attack on a test set; `atpt list`.

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
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .listing import run_list
from .manifest import check_manifest, lock_folder, manifest_config, versions
from .models import DEMO_MODEL, PretrainedUnavailable, create_model

EPILOG_EVAL = """\
units: --eps and --alpha for L-inf attacks (pgd, fgsm, autoattack) are in 1/255 units:
  --eps 4 means 4/255 (the paper's protocol, as in the authors' code); '4/255' may be written
  out, and a bare value below 1 is refused as ambiguous. For L2 attacks (pgdl2, autoattack
  with --attack-opt norm=L2) they are L2 norms of [0,1] images (e.g. --eps 0.5). Defaults:
  the paper's protocol, eps 4/255 with 100 steps on ViTs, eps 1/255 with 1 step on ResNets,
  alpha = eps / 4.
adaptive attacks: --attack eot-pgd (PGD with EOT on each adapter's whole pipeline; --steps,
  --alpha, --attack-opt eot_iter=4 gradient=bpda|exact|fixed_prompt loss=ce|margin) and
  --attack square (gradient-free; --attack-opt n_queries=1000) attack every adapter itself,
  per image: they cost about steps * eot_iter (or n_queries) adaptations per image and
  adapter. --sanity-checks N (default 8, 0 = off) reruns cheaper variants, a large eps and
  the transfer PGD on the first N images and warns in results.md / summary.json when the
  attack fails a check (Carlini et al. 2019; Croce et al. 2022). --attack pgd is the
  paper's transfer attack, for comparison.
resume: the same command into the same --out continues where a killed run stopped; a run
  with other settings into that folder is refused (use a new --out). A full disk stops the
  run with an error naming the file; free space and rerun. Damaged lines in samples.jsonl
  stop it too (with their line numbers): --repair-results drops them and recomputes them.
bad images: an image file that cannot be read or decoded stops the run, naming the file
  and the sample; --on-bad-image skip leaves such samples out of every count and lists
  them in summary.json ("skipped") and results.md. Damaged cache entries are recomputed.
processes: --nproc N starts N processes (torchrun); or run
  torchrun --nproc_per_node N -m atpt_plugin.adapters.cli eval ...
"""


BAD_IMAGE_ADVICE = (
    "\nReplace or remove that file and run the same command again, or add --on-bad-image skip "
    "to leave unreadable images out (listed in summary.json and results.md); finished results "
    "are kept."
)


def _parse_pairs(pairs: Sequence[str], what: str) -> Dict[str, object]:
    from atpt_plugin.specs import parse_setting

    return dict(parse_setting(pair, what) for pair in pairs or [])


def parse_adapters(text: str) -> Dict[str, object]:
    """--adapters "atpt,atpt[aggregator=reliability],rtpt" -> {row name: Adapter}, every name
    and setting checked before anything runs."""
    from atpt_plugin.api import load_adapter_spec
    from atpt_plugin.specs import split_top_level

    adapters = {}
    for spec in split_top_level(text):
        if not spec.strip():
            continue
        adapter = load_adapter_spec(spec)
        if adapter.name in adapters:
            raise ValueError(f"--adapters names {adapter.name!r} twice")
        adapters[adapter.name] = adapter
    if not adapters:
        raise ValueError(f"--adapters must name at least one adapter, got {text!r}")
    return adapters


# ---- eval -----------------------------------------------------------------------------------
def run_eval(args) -> int:
    """One attack (`--attack NAME`) or the worst case over several (`--attack worst --attacks ...`)."""
    from .distributed import DistContext
    from .worst_case import WORST

    attack_opts = _parse_pairs(args.attack_opt, "--attack-opt")
    if args.attack.strip().lower() != WORST:
        if args.attacks:
            raise ValueError("--attacks lists the attacks of a worst case: use it with --attack worst")
        dist = DistContext.from_env()
        try:
            evaluate(
                args, dist, Path(args.out).expanduser(), args.attack, args.steps, args.alpha, args.eps, attack_opts
            )
        finally:
            dist.close()
        return 0
    return run_worst_case(args)


def run_worst_case(args) -> int:
    """Each attack of --attacks in its own resumable folder, then their per-sample AND."""
    from . import worst_case
    from .attacks import make_attack, parse_eps
    from .attacks.base import attack_named
    from .distributed import DistContext
    from .robustbench import write_worst_case_model_info

    runs = worst_case.parse_attacks(args.attacks)
    if args.steps is not None or args.attack_opt:
        raise ValueError(
            "with --attack worst, give each attack its own steps and parameters in brackets: "
            '--attacks "pgd[steps=20],eot-pgd[steps=10,eot_iter=2],square[n_queries=500]" '
            "(--eps and --alpha apply to every attack)"
        )
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; the output is a folder: give a folder path")
    for run in runs:  # every attack's parameters checked before the first one runs
        attack = attack_named(run.name)
        settings = dict(run.settings)
        norm = attack.norm_of({**attack.defaults, **{k: v for k, v in settings.items() if k in attack.defaults}})
        eps, alpha = settings.pop("eps", args.eps), settings.pop("alpha", args.alpha)
        make_attack(
            run.name,
            eps=None if eps is None else parse_eps(str(eps), norm),
            steps=settings.pop("steps", None),
            alpha=None if alpha is None else parse_eps(str(alpha), norm),
            **settings,
        )
    dist = DistContext.from_env()
    try:
        outputs = {}
        for run in runs:
            settings = dict(run.settings)
            steps, alpha, eps = (
                settings.pop("steps", None),
                settings.pop("alpha", args.alpha),
                settings.pop("eps", args.eps),
            )
            outputs[run.label] = evaluate(
                args,
                dist,
                out / "attacks" / run.folder,
                run.name,
                steps,
                None if alpha is None else str(alpha),
                None if eps is None else str(eps),
                settings,
            )
        if dist.rank == 0:
            first = outputs[runs[0].label]
            outcomes = worst_case.collect(out, runs)
            attack_rows = {label: {row["adapter"]: row for row in output["rows"]} for label, output in outputs.items()}
            rows, samples = worst_case.worst_case_rows(outcomes, runs, attack_rows)
            caption = f"{first['caption'].split(', attack:')[0]}, worst case over {', '.join(r.label for r in runs)}"
            attacks = {label: output["attack"] for label, output in outputs.items()}
            files = worst_case.write(
                out, rows, samples, runs, caption, {"attack_runs": attacks, "settings": first["settings"]}
            )
            files += write_worst_case_model_info(rows, outputs, out)
            print(worst_case.markdown(rows, runs, caption))
            print("wrote: " + ", ".join(map(str, files)), file=sys.stderr)
    finally:
        dist.close()
    return 0


def evaluate(args, dist, out: Path, attack_name: str, steps, alpha_text, eps_text, attack_opts) -> dict:
    """One attack on every adapter, resumable in `out`; returns rank 0's summary."""
    import torch

    from .adaptive import SanityChecks
    from .attacks import parse_eps, resolve_attack_name
    from .attacks.base import attack_named
    from .datasets import dataset_info, json_digest
    from .orchestrator import plan_run
    from .report import markdown_table, skipped_note, write_reports
    from .resultlog import ResultLog
    from .robustbench import entry_name, write_row_model_info
    from .storage import atomic_write, make_dir

    # validate the cheap things before any model is built
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {str(out)!r} is an existing file; the output is a folder (run.json, "
            "samples.jsonl, results.md, ...): give a folder path"
        )
    loaded = parse_adapters(args.adapters)
    names = list(loaded)
    info = dataset_info(args.dataset)
    attack_key = resolve_attack_name(attack_name)
    attack = attack_named(attack_key)
    norm = attack.norm_of({**attack.defaults, **attack_opts})
    eps = parse_eps(eps_text, norm) if eps_text is not None else None
    alpha = parse_eps(alpha_text, norm) if alpha_text is not None else None
    overrides = _parse_pairs(args.set, "--set")
    if args.sanity_checks < 0:
        raise ValueError(f"--sanity-checks must be >= 0 (images), got {args.sanity_checks}")

    lock = None
    summary = {}
    try:
        if args.device == "auto":
            device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, tokenizer, model_name, pretrained = create_model(args.model, args.pretrained, args.seed)
        model.to(device)
        plan = plan_run(
            loaded,
            dataset=info.key,
            model=model,
            tokenizer=tokenizer,
            data_dir=args.data_root,
            split=args.split,
            n_examples=args.n_examples,
            seed=args.seed,
            attack=attack_key,
            eps=eps,
            steps=steps,
            alpha=alpha,
            attack_params=attack_opts,
            overrides=overrides,
            dataset_settings=not args.no_dataset_settings,
            device=device,
        )
        spec, dataset, identity = plan.spec, plan.dataset, plan.identity
        configs = {name: manifest_config(name, adapter.config) for name, adapter in plan.adapters.items()}
        settings = {
            "model": model_name,
            "pretrained": pretrained,
            "model_fingerprint": identity["model_fingerprint"],
            "dataset": info.key,
            "data_root": None if dataset.root is None else str(Path(dataset.root).resolve()),
            "split": args.split,
            "dataset_fingerprint": identity["dataset_fingerprint"],
            "n_examples": args.n_examples,
            "selection": identity["selection"],
            "adapters": configs,
            "attack": spec.to_dict(),
            "attacked_prompt": identity["attacked_prompt"],
            "seed": args.seed,
            "attack_batch_size": args.attack_batch_size,
        }
        sanity = SanityChecks(n=args.sanity_checks) if spec.is_adaptive else None
        if sanity is not None:
            settings["sanity_checks"] = sanity.to_dict()
        if len({json_digest(s) for s in dist.gather(settings)}) != 1:
            raise RuntimeError("the processes of this run disagree on its settings (model weights or data differ)")
        out = make_dir(out)
        run_info = {
            "command": sys.argv,
            "versions": versions(),
            "world_size": dist.world,
            "device": str(device),
            "attack": spec.describe(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        lock = lock_folder(out, dist.rank)
        resuming = check_manifest(out, settings, run_info, write=dist.rank == 0)
        if dist.rank == 0:
            print(
                f"{'resuming' if resuming else 'starting'}: {len(plan.source)} images of {dataset.info.title} "
                f"({len(dataset.classnames)} classes), adapters {', '.join(names)}, attack {spec.describe()}, "
                f"{dist.world} process(es) on {device}; results in {out}",
                file=sys.stderr,
            )
        evaluation = plan.evaluation(
            batch=args.attack_batch_size,
            cache_dir=args.cache_dir or default_cache_dir(),
            log=ResultLog(out, dist.rank),
            dist=dist,
            device=device,
            progress=not args.no_progress and dist.rank == 0,
            sanity=sanity,
            on_bad_image=args.on_bad_image,
            repair_results=args.repair_results,
        )
        descriptions = plan.descriptions
        rows = [row.as_dict() for row in evaluation.run()]
        if dist.rank == 0:
            prefix = args.model_name or f"{model_name}-{Path(pretrained).stem if os.sep in pretrained else pretrained}"
            caption = (
                f"{dataset.info.title}, {len(plan.source)} images, {model_name} ({pretrained}), "
                f"attack: {spec.describe()}"
            )
            for row in rows:
                row["model_info"] = write_row_model_info(
                    row,
                    dataset=info.key,
                    attack=spec,
                    architecture=model_name,
                    name=descriptions[row["adapter"]],
                    file_name=entry_name(prefix, row["adapter"]),
                    root=out / "model_info",
                    config=configs[row["adapter"]],
                    device=str(device),
                )
            notes = skipped_note(evaluation.skipped)
            files = write_reports(rows, out, caption, notes)
            warnings = [w for row in rows for w in row.get("warnings") or []]
            summary = {
                "rows": rows,
                "caption": caption,
                "settings": settings,
                "world_size": dist.world,
                "prefix": prefix,
                "device": str(device),
                "descriptions": descriptions,
                "attack": attack_summary(spec, sanity),
                "warnings": warnings,
                "skipped": evaluation.skipped,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
            print(markdown_table(rows, caption, notes))
            for warning in warnings:
                print(f"atpt: warning: {warning}", file=sys.stderr)
            print(
                "wrote: "
                + ", ".join(str(p) for p in [*files, out / "summary.json"] + [Path(r["model_info"]) for r in rows]),
                file=sys.stderr,
            )
    finally:
        if lock is not None:
            lock.close()
    return summary


def attack_summary(spec, sanity=None) -> dict:
    """The attack as the summary JSON records it: name, kind, parameters, cost per image, checks."""
    return {
        "name": spec.name,
        "kind": spec.kind,
        "description": spec.describe(),
        "params": spec.to_dict(),
        "cost": spec.cost(),
        "sanity_checks": sanity.to_dict() if sanity is not None else None,
    }


def default_cache_dir() -> Path:
    base = os.environ.get("ATPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "atpt_plugin"
    )
    return Path(base) / "adversarial"


# ---- entry ----------------------------------------------------------------------------------
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
    ev.add_argument("--adapters", default="atpt", help="comma-separated adapter names (atpt list adapters)")
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
        help="attack name (atpt list attacks), none, or worst (with --attacks) (default: pgd)",
    )
    ev.add_argument(
        "--attacks",
        help="with --attack worst: the attacks whose worst case is reported, each with "
        'its own parameters, e.g. "pgd[steps=20],eot-pgd,square[n_queries=500]"',
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
    ev.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
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
    ls = commands.add_parser("list", help="list every registry: adapters, components, backbones, attacks, datasets")
    ls.add_argument(
        "what",
        nargs="?",
        choices=[
            "adapters",
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
        if args.command != "list":
            _check_eval_extra()
        if args.command == "list":
            return run_list(args)
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
