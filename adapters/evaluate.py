"""`atpt eval` as the command line gives it: one attack on every adapter, or the worst case over
several (one clean pass, each attack's own resumable folder, then their per-sample AND)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict

from .manifest import check_manifest, lock_folder, versions
from .run_inputs import check_inputs, parse_pairs, prepare_run, run_inputs


# ---- eval -----------------------------------------------------------------------------------
def run_eval(args) -> int:
    """One attack (`--attack NAME`) or the worst case over several (`--attack worst --attacks ...`)."""
    from .distributed import DistContext
    from .worst_case import WORST

    attack_opts = parse_pairs(args.attack_opt, "--attack-opt")
    for key, value in attack_opts.items():
        if key in DEDICATED_FLAGS:
            flag = DEDICATED_FLAGS[key]
            how = (
                f"{flag} {value}"
                if key == "steps"
                else f"{flag} (L-inf budgets there are in 1/255 units: {flag} 4 means 4/255; L2 ones are plain norms)"
            )
            raise ValueError(f"--attack-opt {key}={value}: the attack's {key} has its own flag: use {how}")
    if args.attack.strip().lower() != WORST:
        if args.attacks or args.independent:
            raise ValueError("--attacks and --independent are for a worst case: use them with --attack worst")
        name, steps, alpha, eps = bracketed_attack(args, attack_opts)
        dist = DistContext.from_env()
        try:
            evaluate(args, dist, Path(args.out).expanduser(), name, steps, alpha, eps, attack_opts)
        finally:
            dist.close()
        return 0
    return run_worst_case(args)


DEDICATED_FLAGS = {"steps": "--attack-steps", "eps": "--eps", "alpha": "--alpha"}


def bracketed_attack(args, attack_opts: Dict[str, object]):
    """(name, steps, alpha, eps) from --attack "pgd[steps=20,eps=8]" and the flags; the bracket's
    other settings join `attack_opts`. A setting given both ways is refused."""
    from atpt_plugin.specs import parse_named_settings

    name, settings = parse_named_settings(args.attack, "--attack")
    given = {"steps": args.steps, "alpha": args.alpha, "eps": args.eps}
    for key, value in settings.items():
        flag = DEDICATED_FLAGS.get(key, "--attack-opt")
        if given.get(key) is not None or key in attack_opts:
            raise ValueError(f"--attack {args.attack!r} sets {key} and so does {flag}: give it once")
        if key in given:
            given[key] = value if key == "steps" else str(value)
        else:
            attack_opts[key] = value
    return name, given["steps"], given["alpha"], given["eps"]


def check_worst_case_attack(run, args) -> None:
    """One attack of --attacks with its parameters, checked before anything runs."""
    from .attacks import make_attack, parse_eps
    from .attacks.base import attack_named

    attack = attack_named(run.name)
    settings = dict(run.settings)
    norm = attack.norm_of({**attack.defaults, **{k: v for k, v in settings.items() if k in attack.defaults}})
    eps, alpha = settings.pop("eps", args.eps), settings.pop("alpha", args.alpha)
    try:
        make_attack(
            run.name,
            eps=None if eps is None else parse_eps(str(eps), norm),
            steps=settings.pop("steps", None),
            alpha=None if alpha is None else parse_eps(str(alpha), norm, flag="--alpha"),
            **settings,
        )
    except ValueError as error:
        raise ValueError(f"--attacks {run.label!r}: {error}") from None


def run_worst_case(args) -> int:
    """One clean pass, each attack of --attacks in its own resumable folder (a cascade on the
    survivors, or `--independent`ly on every sample), then their per-sample AND."""
    from . import worst_case
    from .distributed import DistContext
    from .leaderboard import write_worst_case_model_info

    runs = worst_case.parse_attacks(args.attacks, check=lambda run: check_worst_case_attack(run, args))
    if args.steps is not None or args.attack_opt:
        raise ValueError(
            "with --attack worst, give each attack its own steps and parameters in brackets: "
            '--attacks "pgd[steps=20],eot-pgd[steps=10,eot_iter=2],square[n_queries=500]" '
            "(--eps and --alpha apply to every attack)"
        )
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; the output is a folder: give a folder path")
    independent = args.independent
    dist = DistContext.from_env()
    try:
        evaluate(args, dist, out / worst_case.CLEAN, "none", None, None, None, {})  # the one clean pass
        clean_records = worst_case.collect(out, [])
        clean = {(name, p): o.clean[p] for name, o in clean_records.items() for p in o.clean}
        outputs, wall = {}, {}
        for done, run in enumerate(runs):
            settings = dict(run.settings)
            steps, alpha, eps = (
                settings.pop("steps", None),
                settings.pop("alpha", args.alpha),
                settings.pop("eps", args.eps),
            )
            targets = (
                None if independent else worst_case.survivors(worst_case.collect(out, runs[:done], False), runs[:done])
            )
            start = time.perf_counter()
            outputs[run.label] = evaluate(
                args,
                dist,
                out / "attacks" / run.folder,
                run.name,
                steps,
                None if alpha is None else str(alpha),
                None if eps is None else str(eps),
                settings,
                clean=clean,
                targets=targets,
            )
            wall[run.label] = round(time.perf_counter() - start, 3)
        if dist.rank == 0:
            first = outputs[runs[0].label]
            outcomes = worst_case.collect(out, runs, independent)
            attack_rows = {label: {row["adapter"]: row for row in output["rows"]} for label, output in outputs.items()}
            rows, samples = worst_case.worst_case_rows(outcomes, runs, attack_rows, independent)
            caption = f"{first['caption'].split(', attack:')[0]}, worst case over {', '.join(r.label for r in runs)}"
            caption += " (independent)" if independent else " (cascade)"
            attacks = {label: output["attack"] for label, output in outputs.items()}
            extra = {"attack_runs": attacks, "settings": first["settings"], "attack_wall_seconds": wall}
            files = worst_case.write(out, rows, samples, runs, caption, extra, independent)
            files += write_worst_case_model_info(rows, outputs, out)
            print(worst_case.markdown(rows, runs, caption, independent))
            print("wrote: " + ", ".join(map(str, files)), file=sys.stderr)
    finally:
        dist.close()
    return 0


def evaluate(
    args, dist, out: Path, attack_name: str, steps, alpha_text, eps_text, attack_opts, clean=None, targets=None
) -> dict:
    """One attack on every adapter, resumable in `out`; returns rank 0's summary. A worst case
    passes its clean predictions ({(adapter, position): class}) and, in a cascade, the
    samples each adapter is attacked on ({adapter: positions})."""
    from .datasets import json_digest
    from .device import resolve_device
    from .leaderboard import entry_name, write_row_model_info
    from .report import markdown_table, skipped_note, write_reports
    from .resultlog import ResultLog
    from .storage import atomic_write, make_dir, warn

    # validate the cheap things before any model is built
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {str(out)!r} is an existing file; the output is a folder (run.json, "
            "samples.jsonl, results.md, ...): give a folder path"
        )
    inputs = run_inputs(args, attack_name, steps, alpha_text, eps_text, attack_opts)
    check_inputs(inputs)
    if args.ece_bins < 1:
        raise ValueError(f"--ece-bins must be >= 1 (the calibration papers use 20), got {args.ece_bins}")

    lock = None
    summary = {}
    try:
        device = resolve_device(args.device, dist.local_rank)
        prepared = prepare_run(inputs, device)
        plan, settings, configs, names = prepared.plan, prepared.settings, prepared.configs, prepared.names
        spec, dataset, sanity = plan.spec, plan.dataset, prepared.sanity
        model_name, pretrained = prepared.model_name, prepared.pretrained
        if len({json_digest(s) for s in dist.gather(settings)}) != 1:
            raise RuntimeError("the processes of this run disagree on its settings (model weights or data differ)")
        out = make_dir(out)
        run_info = {
            "command": sys.argv,
            "inputs": inputs,
            "versions": versions(),
            "world_size": dist.world,
            "device": str(device),
            "attack": spec.describe(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        lock = lock_folder(out, dist.rank)
        resuming = check_manifest(out, settings, run_info, write=dist.rank == 0)
        if dist.rank == 0:
            if inputs["n_examples"] is not None and inputs["n_examples"] > len(dataset):
                warn(
                    f"--n-examples {inputs['n_examples']} is more than {dataset.info.title} holds: it has "
                    f"{len(dataset)} images, and all {len(plan.source)} of them run"
                )
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
            clean=clean,
            targets=targets,
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
            if targets is not None:  # a cascade's attack sees a subset: no leaderboard entry of its own
                caption += ", only on the samples clean and every earlier attack left robust (cascade)"
            for row in rows if targets is None else []:
                row["model_info"] = write_row_model_info(
                    row,
                    dataset=prepared.dataset_key,
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
                "integrity": evaluation.integrity,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
            print(markdown_table(rows, caption, notes))
            print(integrity_line(evaluation.integrity, out), file=sys.stderr)
            for warning in warnings:
                print(f"atpt: warning: {warning}", file=sys.stderr)
            print(
                "wrote: "
                + ", ".join(
                    str(p)
                    for p in [*files, out / "summary.json"] + [Path(r["model_info"]) for r in rows if "model_info" in r]
                ),
                file=sys.stderr,
            )
    finally:
        if lock is not None:
            lock.close()
    return summary


def integrity_line(integrity: dict, out: Path) -> str:
    """What the final check of the results files found, in one line."""
    rejected = integrity.get("rejected") or []
    note = f"; {len(rejected)} rejected record(s) stay in the files (--repair-results drops them)" if rejected else ""
    return f"verified {integrity.get('verified', 0)} record(s) in {out} (checksums, labels, positions){note}"


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
