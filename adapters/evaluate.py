"""`atpt eval` as the command line gives it: one attack on every adapter, or the worst case over
several (each attack's own resumable folder, then their per-sample AND)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

from .manifest import check_manifest, lock_folder, manifest_config, versions
from .models import create_model


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
    from .leaderboard import write_worst_case_model_info

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
    from .leaderboard import entry_name, write_row_model_info
    from .orchestrator import plan_run
    from .report import markdown_table, skipped_note, write_reports
    from .resultlog import ResultLog
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
    if args.ece_bins < 1:
        raise ValueError(f"--ece-bins must be >= 1 (the calibration papers use 20), got {args.ece_bins}")
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
            ece_bins=args.ece_bins,
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
