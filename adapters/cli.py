"""The `atpt` command: `atpt eval ...` runs adapters under an attack on a test set; `atpt list`.

    atpt eval --model ViT-B-16 --pretrained openai --dataset pets --data-root DATA \\
              --adapters atpt,rtpt,tpt --attack pgd --eps 4 --steps 100 --n-examples 1000 --out results/pets

Output folder: run.json (the run's manifest), samples.jsonl (one line per sample and
adapter, appended as they finish; samples.rank<r>.jsonl for other ranks), summary.json,
results.md, results.csv, results.png, model_info/<dataset>/<threat>/<name>.json
(RobustBench's leaderboard format). Starting the same command again resumes; a different
command into the same folder is refused. `--nproc N` (or torchrun) shards the samples over
N processes. See `atpt eval --help` for the units of --eps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
  with other settings into that folder is refused (use a new --out).
processes: --nproc N starts N processes (torchrun); or run
  torchrun --nproc_per_node N -m atpt_plugin.adapters.cli eval ...
"""


class RunConflict(ValueError):
    """The output folder holds a run with other settings."""


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights that cannot be had (offline, unknown tag, missing file)."""


# ---- model ------------------------------------------------------------------------------
DEMO_MODEL = "demo"  # the embedded small CLIP trained on Fashion-MNIST, with its shipped weights


def create_model(name: str, pretrained: Optional[str], seed: int = 0):
    """(model, tokenizer, model name, pretrained as recorded) for an open_clip name or config.

    name: an open_clip model name (`open_clip.list_models()`) or a path to a model config
    JSON (its file stem becomes the name); `hf:<id or folder>` goes to `hf_models`. pretrained: a tag ("openai"), a path to a state
    dict, or "none" for random initialisation seeded with `seed`.
    """
    import open_clip
    import torch

    from .datasets import unknown_name
    from .hf_models import HF_PREFIX, create_hf_model

    if name.startswith(HF_PREFIX):
        return create_hf_model(name[len(HF_PREFIX):], pretrained, seed)
    if name == DEMO_MODEL:
        from atpt_plugin.demo_model import MODEL_NAME, checkpoint_path
        name = MODEL_NAME
        if pretrained in (None, "", "openai"):
            pretrained = str(checkpoint_path())
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model config {str(path)!r} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise unknown_name("model", name, open_clip.list_models())
    tag = None if pretrained in (None, "", "none", "None", "random") else pretrained
    recorded = "none"
    if tag is not None:
        local = Path(tag).expanduser()
        if local.exists():
            tag = str(local.resolve())
            recorded = tag
        elif "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise PretrainedUnavailable(f"--pretrained {tag!r} looks like a file path but does not exist")
        else:
            known = open_clip.list_pretrained_tags_by_model(name)
            if tag not in known:
                raise PretrainedUnavailable(
                    f"{tag!r} is not a pretrained tag of {name}; its tags: {', '.join(known) or 'none'}; "
                    "or pass a local file: --pretrained /path/to/open_clip_pytorch_model.bin")
            recorded = tag
    torch.manual_seed(seed)
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except RuntimeError as error:
        if tag is not None and not Path(tag).exists():
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
            why = "offline mode (HF_HUB_OFFLINE is set)" if offline else "no network access or no cached copy"
            raise PretrainedUnavailable(
                f"the pretrained weights {tag!r} of {name} could not be fetched ({why}): {error}\n"
                f"Fetch them on a machine with internet access (open_clip.create_model({name!r}, "
                f"pretrained={tag!r}) fills the Hugging Face cache; copy ~/.cache/huggingface over), "
                "or pass a local file: --pretrained /path/to/open_clip_pytorch_model.bin") from None
        raise
    return model.eval(), open_clip.get_tokenizer(name), name, recorded


# ---- run folder -------------------------------------------------------------------------
def check_manifest(out: Path, settings: dict, info: dict, write: bool) -> bool:
    """Refuse a folder holding another run; True when resuming. Rank 0 writes the manifest."""
    path = out / "run.json"
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    if path.exists():
        stored = json.loads(path.read_text())
        old = stored.get("settings", {})
        if old != settings:
            changed = [f"  {k}: {_short(a)} (in the folder) -> {_short(b)} (now)" for k, a, b in _changes(old, settings)]
            if len(changed) > 12:
                changed = changed[:12] + [f"  ... and {len(changed) - 12} more"]
            raise RunConflict(
                f"{out} holds a run with other settings; its results would mix with this one's:\n"
                + "\n".join(changed)
                + f"\nUse another --out, or delete {out} to start over.")
        return True
    if any(out.glob("samples*.jsonl")):
        raise RunConflict(f"{out} has results files but no run.json; it was not made by this command "
                          "(or run.json was deleted): use another --out")
    if write:
        from .attacks import _atomic_write
        _atomic_write(path, json.dumps({"settings": settings, "info": info}, indent=2, sort_keys=True).encode())
    return False


def lock_folder(out: Path, rank: int):
    """An exclusive lock per rank on the folder: two runs never append to one results file."""
    handle = open(out / f".lock.rank{rank}", "w")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunConflict(f"another `atpt eval` is writing to {out} (rank {rank}); wait for it or use another --out")
    return handle


ABSENT = "(absent)"


def _changes(old, new, prefix: str = "") -> list:
    """[(dotted key, old value, new value)] where two nested settings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            out += _changes(old.get(key, ABSENT), new.get(key, ABSENT), name)
        return out
    return [] if old == new else [(prefix, old, new)]


def _short(value) -> str:
    text = value if value == ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _parse_pairs(pairs: Sequence[str], what: str) -> Dict[str, object]:
    from atpt_plugin.api import parse_setting
    return dict(parse_setting(pair, what) for pair in pairs or [])


def parse_adapters(text: str) -> Dict[str, object]:
    """--adapters "atpt,atpt[aggregator=reliability],rtpt" -> {row name: Adapter}, every name
    and setting checked before anything runs."""
    from atpt_plugin.api import load_adapter_spec, split_top_level

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


def manifest_config(name: str, config) -> dict:
    """The adapter's settings as run.json records them; an unregistered component object
    cannot be recorded by name, so a resumable run refuses it."""
    record = config.record()
    for field, value in record.items():
        if isinstance(value, dict) and value.get("name") is None:
            raise ValueError(
                f"adapter {name!r} has {field}={getattr(config, field)!r}, an object of an unregistered class: "
                "a resumable run records components by name; register it (@<KIND>.register or an entry point)")
    return record


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for package in ("atpt-plugin", "torch", "open_clip_torch", "timm", "torchattacks"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


# ---- eval -----------------------------------------------------------------------------------
def run_eval(args) -> int:
    import torch

    from atpt_plugin.backbones import detect

    from .adaptive import SanityChecks
    from .attacks import (ATTACKS, AdversarialCache, ZeroShotClassifier, make_attack, model_fingerprint, parse_eps,
                          resolve_attack_name)
    from .datasets import dataset_info, json_digest, load_dataset, select
    from .report import markdown_table, write_reports
    from .robustbench import applicable_overrides, write_row_model_info
    from .runner import DatasetSource, DistContext, Evaluation, ResultLog

    # validate the cheap things before any model is built
    loaded = parse_adapters(args.adapters)
    names = list(loaded)
    info = dataset_info(args.dataset)
    attack_key = resolve_attack_name(args.attack)
    attack_opts = _parse_pairs(args.attack_opt, "--attack-opt")
    norm = ATTACKS[attack_key].norm
    if attack_key in ("autoattack", "square"):
        norm = attack_opts.get("norm", "Linf")
    eps = parse_eps(args.eps, norm) if args.eps is not None else None
    alpha = parse_eps(args.alpha, norm) if args.alpha is not None else None
    overrides = _parse_pairs(args.set, "--set")
    if args.sanity_checks < 0:
        raise ValueError(f"--sanity-checks must be >= 0 (images), got {args.sanity_checks}")

    dist = DistContext.from_env()
    lock = None
    try:
        if args.device == "auto":
            device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, tokenizer, model_name, pretrained = create_model(args.model, args.pretrained, args.seed)
        fingerprint = model_fingerprint(model)
        model.to(device)
        image_size = detect(model, has_text=True).image_size
        dataset = load_dataset(info.key, args.data_root, split=args.split, image_size=image_size)
        indices = select(len(dataset), args.n_examples, args.seed)
        source = DatasetSource(dataset, indices)

        adapters, configs, descriptions = {}, {}, {}
        for name, adapter in loaded.items():
            extra = {} if args.no_dataset_settings else applicable_overrides(adapter.config, info)
            try:
                adapter = adapter.with_overrides(**{**extra, "seed": args.seed, **overrides})
            except TypeError as error:
                raise ValueError(f"--set: {error}") from None
            adapters[name] = adapter.wrap(model, classnames=dataset.classnames, tokenizer=tokenizer)
            configs[name] = manifest_config(name, adapter.config)
            descriptions[name] = adapter.description
        kind = next(iter(adapters.values())).backbone.kind
        spec = make_attack(attack_key, eps=eps, steps=args.steps, alpha=alpha, backbone_kind=kind,
                           image_size=image_size, **attack_opts)
        domain = None if args.no_dataset_settings else info.domain_word
        attacked = ZeroShotClassifier.build(model, dataset.classnames, tokenizer, domain_word=domain) \
            if spec.is_attack else None

        settings = {
            "model": model_name, "pretrained": pretrained, "model_fingerprint": fingerprint,
            "dataset": info.key, "data_root": str(Path(dataset.root).resolve()), "split": args.split,
            "dataset_fingerprint": dataset.fingerprint(), "n_examples": args.n_examples,
            "selection": json_digest([dataset.sample_id(i) for i in indices]),
            "adapters": configs, "attack": spec.to_dict(),
            "attacked_prompt": attacked.prompt_phrase if attacked else None,
            "seed": args.seed, "attack_batch_size": args.attack_batch_size,
        }
        sanity = SanityChecks(n=args.sanity_checks) if spec.is_adaptive else None
        if sanity is not None:
            settings["sanity_checks"] = sanity.to_dict()
        if len({json_digest(s) for s in dist.gather(settings)}) != 1:
            raise RuntimeError("the processes of this run disagree on its settings (model weights or data differ)")
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        run_info = {"command": sys.argv, "versions": _versions(), "world_size": dist.world,
                    "device": str(device), "attack": spec.describe(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        lock = lock_folder(out, dist.rank)
        resuming = check_manifest(out, settings, run_info, write=dist.rank == 0)
        cache_key = {key: settings[key] for key in ("model", "pretrained", "model_fingerprint", "dataset",
                                                     "split", "dataset_fingerprint", "seed", "attacked_prompt")}
        cache_key.update(attack_name=spec.name, attack=spec.to_dict(), batch=args.attack_batch_size,
                         image_size=image_size)
        # adaptive attacks are made per adapter and per image: not cached (samples.jsonl resumes them)
        cache = AdversarialCache(None if spec.is_adaptive else args.cache_dir or default_cache_dir(), cache_key)
        if dist.rank == 0:
            print(f"{'resuming' if resuming else 'starting'}: {len(indices)} images of {dataset.info.title} "
                  f"({len(dataset.classnames)} classes), adapters {', '.join(names)}, attack {spec.describe()}, "
                  f"{dist.world} process(es) on {device}; results in {out}", file=sys.stderr)
        evaluation = Evaluation(adapters, source, spec, attacked, cache, seed=args.seed,
                                attack_batch_size=args.attack_batch_size, log=ResultLog(out, dist.rank),
                                dist=dist, device=device, progress=not args.no_progress and dist.rank == 0,
                                sanity=sanity, backbone_kind=kind, image_size=image_size)
        rows = [row.as_dict() for row in evaluation.run()]
        if dist.rank == 0:
            prefix = args.model_name or f"{model_name}-{Path(pretrained).stem if os.sep in pretrained else pretrained}"
            caption = (f"{dataset.info.title}, {len(indices)} images, {model_name} ({pretrained}), "
                       f"attack: {spec.describe()}")
            for row in rows:
                row["model_info"] = write_row_model_info(
                    row, dataset=info.key, attack=spec, architecture=model_name, name=descriptions[row["adapter"]],
                    file_name=re.sub(r"[^\w.-]+", "_", f"{prefix}_{row['adapter']}"), root=out / "model_info")
            files = write_reports(rows, out, caption)
            warnings = [w for row in rows for w in row.get("warnings") or []]
            summary = {"rows": rows, "caption": caption, "settings": settings, "world_size": dist.world,
                       "attack": attack_summary(spec, sanity), "warnings": warnings,
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(markdown_table(rows, caption))
            for warning in warnings:
                print(f"atpt: warning: {warning}", file=sys.stderr)
            print("wrote: " + ", ".join(str(p) for p in [*files, out / "summary.json"]
                                        + [Path(r["model_info"]) for r in rows]), file=sys.stderr)
    finally:
        if lock is not None:
            lock.close()
        dist.close()
    return 0


def attack_summary(spec, sanity=None) -> dict:
    """The attack as the summary JSON records it: name, kind, parameters, cost per image, checks."""
    return {"name": spec.name, "kind": spec.kind, "description": spec.describe(), "params": spec.to_dict(),
            "cost": spec.cost(), "sanity_checks": sanity.to_dict() if sanity is not None else None}


def default_cache_dir() -> Path:
    base = os.environ.get("ATPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "atpt_plugin")
    return Path(base) / "adversarial"


# ---- list ----------------------------------------------------------------------------------
def run_list(args) -> int:
    from atpt_plugin import list_adapters

    from .attacks import ATTACKS
    from .datasets import DATASETS

    what = args.what
    if what in (None, "adapters"):
        print("adapters (--adapters a,b,c):")
        for name, description in list_adapters().items():
            print(f"  {name:<20} {description}")
    if what in (None, "datasets"):
        print("datasets (--dataset NAME --data-root DIR):")
        for info in DATASETS.values():
            word = f", domain word {info.domain_word!r}" if info.domain_word else ""
            print(f"  {info.key:<16} {info.title}{word}\n  {'':<16} layout: {info.layout}")
    if what in (None, "attacks"):
        print("attacks (--attack NAME; --eps in 1/255 for L-inf, L2 norm for L2); transfer attacks are made "
              "once on zero-shot CLIP, adaptive ones on each adapter:")
        for kind in ATTACKS.values():
            shown = {"alpha": "eps/4", "steps": "100 (1 on ResNets)" if kind.name == "pgd" else None}
            params = ", ".join(f"{k}={shown.get(k) or v}" for k, v in kind.defaults)
            print(f"  {kind.name:<12} {kind.norm or '-':<5} {kind.kind:<9} {kind.description}" + (f" [{params}]" if params else ""))
    return 0


# ---- entry ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atpt", description="Evaluate test-time adapters (A-TPT and baselines) "
                                     "on CLIP under adversarial attacks.")
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", help="run adapters on a test set, clean and under attack",
                             epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default=DEMO_MODEL,
                    help="open_clip model name (ViT-B-16, RN50, ...), a model config .json, 'demo' (default: the "
                         "embedded Fashion-MNIST CLIP with its shipped weights), or hf:<Hugging Face id or local "
                         "folder> (a transformers CLIPModel or SiglipModel, e.g. hf:openai/clip-vit-base-patch16)")
    ev.add_argument("--pretrained", default="openai",
                    help="pretrained tag (openai), a local state-dict file, or 'none' for random init (default: openai)")
    ev.add_argument("--dataset", default="demo",
                    help="dataset name (atpt list datasets; default: the shipped Fashion-MNIST demo subset)")
    ev.add_argument("--data-root", help="the folder holding the dataset folders (or the dataset folder); "
                                        "not needed for the demo subset")
    ev.add_argument("--split", default="test", help="split of split-file datasets (default: test)")
    ev.add_argument("--adapters", default="atpt", help="comma-separated adapter names (atpt list adapters)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override an adapter setting for all adapters, e.g. --set views=32 (repeatable)")
    ev.add_argument("--no-dataset-settings", action="store_true",
                    help="do not apply the dataset's domain word / ImageNet no-AugMix convention")
    ev.add_argument("--attack", default="pgd", help="attack name (atpt list attacks), or none (default: pgd)")
    ev.add_argument("--eps", help="attack budget; L-inf in 1/255 units (4 = 4/255), see below")
    ev.add_argument("--alpha", help="step size, in the unit of --eps (default: eps / 4)")
    ev.add_argument("--steps", type=int, help="attack steps (default: 100 ViT, 1 ResNet)")
    ev.add_argument("--attack-opt", action="append", metavar="KEY=VALUE",
                    help="other attack parameters, e.g. random_start=false, c=1, version=standard, norm=L2")
    ev.add_argument("--sanity-checks", type=int, default=8, metavar="N",
                    help="adaptive attacks: run the sanity checks on the first N images (default 8; 0: off)")
    ev.add_argument("--n-examples", type=int, help="evaluate the first N of a seeded permutation (default: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the selection, the attack and the adapters")
    ev.add_argument("--out", required=True, help="output folder (resumable)")
    ev.add_argument("--cache-dir", help="adversarial image cache (default: $ATPT_CACHE or ~/.cache/atpt_plugin)")
    ev.add_argument("--attack-batch-size", type=int, default=32, help="images per attack batch (default: 32)")
    ev.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
    ev.add_argument("--nproc", type=int, default=1, help="processes to shard the samples over (uses torchrun)")
    ev.add_argument("--model-name", help="leaderboard name prefix (default: <model>-<pretrained>)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    ls = commands.add_parser("list", help="list adapters, datasets and attacks")
    ls.add_argument("what", nargs="?", choices=["adapters", "datasets", "attacks"])
    return parser


def _relaunch(argv: List[str], nproc: int) -> int:
    """Run this command under torchrun with `nproc` processes (without --nproc)."""
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "atpt_plugin.adapters.cli", *rest]
    return subprocess.call(command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .attacks import CacheMismatchError
    from .datasets import DatasetLayoutError
    try:
        if args.command == "list":
            return run_list(args)
        if args.command in ("explain", "stability"):
            from .explain import run_explain, run_stability
            return (run_explain if args.command == "explain" else run_stability)(args)
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return _relaunch(argv, args.nproc)
        return run_eval(args)
    except (ValueError, FileNotFoundError, PretrainedUnavailable, CacheMismatchError, DatasetLayoutError) as error:
        if os.environ.get("ATPT_DEBUG"):
            raise
        print(f"atpt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
