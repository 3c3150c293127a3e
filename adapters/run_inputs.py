"""The run a set of plain inputs describes: model, data, adapters, attack and the settings run.json
records. `atpt eval` builds its run here and keeps the inputs in run.json, so that `atpt verify`
rebuilds the very same run from a results folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence

from .manifest import manifest_config
from .models import create_model


def parse_pairs(pairs: Sequence[str], what: str) -> Dict[str, object]:
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


def run_inputs(args, attack_name: str, steps, alpha_text, eps_text, attack_opts) -> dict:
    """What one attack's run is made from, as plain values: run.json keeps them (`info.inputs`)
    so that `atpt verify` rebuilds the same run."""
    return {
        "model": _absolute(args.model) if str(args.model).endswith(".json") else args.model,
        "pretrained": _absolute(args.pretrained),
        "dataset": args.dataset,
        "data_root": _absolute(args.data_root),
        "split": args.split,
        "n_examples": args.n_examples,
        "seed": args.seed,
        "adapters": args.adapters,
        "set": list(args.set or []),
        "no_dataset_settings": bool(args.no_dataset_settings),
        "attack": attack_name,
        "steps": steps,
        "alpha": alpha_text,
        "eps": eps_text,
        "attack_opts": dict(attack_opts),
        "attack_batch_size": args.attack_batch_size,
        "sanity_checks": args.sanity_checks,
    }


def _absolute(path):
    """An existing local path made absolute, so that a run is rebuilt from any working directory;
    anything else (a tag, a name, None) as given."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


@dataclass
class PreparedRun:
    """A run rebuilt from its inputs: the plan, the settings run.json records, and what else reports need."""

    plan: object
    settings: dict
    configs: dict
    names: list
    model_name: str
    pretrained: str
    dataset_key: str
    sanity: object


def check_inputs(inputs: dict) -> None:
    """The cheap checks, before any model is built."""
    from .attacks import make_attack, parse_eps, resolve_attack_name
    from .attacks.base import attack_named
    from .datasets import dataset_info

    parse_adapters(inputs["adapters"])
    dataset_info(inputs["dataset"])
    attack_key = resolve_attack_name(inputs["attack"])
    attack = attack_named(attack_key)
    norm = attack.norm_of({**attack.defaults, **inputs["attack_opts"]})
    budgets = {k: None if inputs[k] is None else parse_eps(inputs[k], norm, flag=f"--{k}") for k in ("eps", "alpha")}
    try:  # the attack's own checks (steps, parameters) before any model is built
        make_attack(attack_key, steps=inputs["steps"], **budgets, **inputs["attack_opts"])
    except ValueError as error:
        raise ValueError(f"--attack {inputs['attack']}: {error}") from None
    parse_pairs(inputs["set"], "--set")
    if inputs["sanity_checks"] < 0:
        raise ValueError(f"--sanity-checks must be >= 0 (images), got {inputs['sanity_checks']}")


def prepare_run(inputs: dict, device) -> PreparedRun:
    """The run `inputs` describe (`run_inputs`) on `device`: model, data, adapters, attack and the settings."""
    from .adaptive import SanityChecks
    from .attacks import parse_eps, resolve_attack_name
    from .attacks.base import attack_named
    from .datasets import dataset_info
    from .orchestrator import plan_run

    check_inputs(inputs)
    loaded = parse_adapters(inputs["adapters"])
    info = dataset_info(inputs["dataset"])
    attack_key = resolve_attack_name(inputs["attack"])
    attack_opts = inputs["attack_opts"]
    attack = attack_named(attack_key)
    norm = attack.norm_of({**attack.defaults, **attack_opts})
    eps, alpha = (None if inputs[k] is None else parse_eps(inputs[k], norm, flag=f"--{k}") for k in ("eps", "alpha"))
    model, tokenizer, model_name, pretrained = create_model(inputs["model"], inputs["pretrained"], inputs["seed"])
    model.to(device)
    plan = plan_run(
        loaded,
        dataset=info.key,
        model=model,
        tokenizer=tokenizer,
        data_dir=inputs["data_root"],
        split=inputs["split"],
        n_examples=inputs["n_examples"],
        seed=inputs["seed"],
        attack=attack_key,
        eps=eps,
        steps=inputs["steps"],
        alpha=alpha,
        attack_params=attack_opts,
        overrides=parse_pairs(inputs["set"], "--set"),
        dataset_settings=not inputs["no_dataset_settings"],
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
        "split": inputs["split"],
        "dataset_fingerprint": identity["dataset_fingerprint"],
        "n_examples": inputs["n_examples"],
        "selection": identity["selection"],
        "adapters": configs,
        "attack": spec.to_dict(),
        "attacked_prompt": identity["attacked_prompt"],
        "seed": inputs["seed"],
        "attack_batch_size": inputs["attack_batch_size"],
    }
    sanity = SanityChecks(n=inputs["sanity_checks"]) if spec.is_adaptive else None
    if sanity is not None:
        settings["sanity_checks"] = sanity.to_dict()
    return PreparedRun(plan, settings, configs, list(loaded), model_name, pretrained, info.key, sanity)
