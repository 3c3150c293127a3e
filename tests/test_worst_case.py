"""Worst case over attacks: the per-sample AND of clean and every attack's outcome, resumable
per (sample, adapter, attack), with test-time-defence leaderboard entries."""

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.leaderboard import DEFENCE_FIELDS
from atpt_plugin.adapters.worst_case import AdapterOutcome, AttackRun, parse_attacks, survivors, worst_case_rows

ATTACKS = "pgd[steps=2],eot-pgd[steps=1,eot_iter=1],square[n_queries=4]"
RUN = [
    "eval",
    "--model",
    "fmnist-vit-tiny",
    "--adapters",
    "zeroshot,ens",
    "--set",
    "views=4",
    "--n-examples",
    "6",
    "--attack",
    "worst",
    "--attacks",
    ATTACKS,
    "--eps",
    "1",
    "--attack-batch-size",
    "3",
    "--sanity-checks",
    "0",
    "--no-progress",
]
WALL_CLOCK = {
    "seconds_per_image",
    "seconds",
    "attack_seconds_per_image",
    "model_info",
    "finished",
    "started",
    "checks_seconds",
}


LABELS = {0: 1, 1: 2, 2: 0, 3: 1, 4: 2, 5: 0}
CLEAN = {0: 1, 1: 2, 2: 1, 3: 1, 4: 2, 5: 0}  # sample 2 wrong clean
ADV = {  # every attack on every sample, as --independent runs them
    "a": {0: 1, 1: 0, 2: 0, 3: 1, 4: 2, 5: 1},  # 1 and 5 fall to a
    "b": {0: 1, 1: 2, 2: 0, 3: 0, 4: 2, 5: 2},  # 3 and 5 fall to b
}
RUNS = [AttackRun("a", "pgd", {}), AttackRun("b", "square", {})]


def cascade_outcome():
    """What a cascade records: each attack only on the samples clean and the earlier attacks left robust."""
    outcome = AdapterOutcome("m", dict(LABELS), dict(CLEAN))
    alive = {p for p in LABELS if CLEAN[p] == LABELS[p]}
    for run in RUNS:
        outcome.adv[run.label] = {p: ADV[run.label][p] for p in alive}
        alive = {p for p in alive if ADV[run.label][p] == LABELS[p]}
    return outcome


def test_worst_case_is_the_per_sample_and_of_clean_and_every_attack():
    """Outcomes forced by hand, against a plain reference written here."""
    rows, samples = worst_case_rows({"m": AdapterOutcome("m", LABELS, CLEAN, ADV)}, RUNS, {"a": {}, "b": {}})
    expected = [p for p in LABELS if CLEAN[p] == LABELS[p] and all(ADV[r][p] == LABELS[p] for r in ADV)]
    assert expected == [0, 4]
    row = rows[0]
    assert row["worst_case_correct"] == 2 and row["worst_case_acc"] == pytest.approx(2 / 6)
    assert row["adv_acc_by_attack"] == {"a": pytest.approx(4 / 6), "b": pytest.approx(4 / 6)}
    assert row["robust_acc_after_attack"] == {"a": pytest.approx(3 / 6), "b": pytest.approx(2 / 6)}  # cumulative
    # fooled by it and by no other attack, among the samples correct clean: 1 by a, 3 by b (5 by both)
    assert {label: s["fooled_only"] for label, s in row["attack_stats"].items()} == {"a": 1, "b": 1}
    assert {label: s["attacked"] for label, s in row["attack_stats"].items()} == {"a": 6, "b": 6}
    fooled = {s["position"]: s["fooled_by"] for s in samples}
    assert fooled[1] == ["a"] and fooled[3] == ["b"] and fooled[5] == ["a", "b"] and fooled[2] == []
    assert [s["position"] for s in samples if s["worst_case_correct"]] == expected


def test_a_cascade_gives_the_same_per_sample_worst_case_and_attacks_only_survivors():
    independent, samples = worst_case_rows({"m": AdapterOutcome("m", LABELS, CLEAN, ADV)}, RUNS, {"a": {}, "b": {}})
    cascade, cascade_samples = worst_case_rows({"m": cascade_outcome()}, RUNS, {"a": {}, "b": {}}, independent=False)
    assert [s["worst_case_correct"] for s in cascade_samples] == [s["worst_case_correct"] for s in samples]
    assert cascade[0]["worst_case_acc"] == independent[0]["worst_case_acc"]
    assert cascade[0]["robust_acc_after_attack"] == independent[0]["robust_acc_after_attack"]
    assert cascade[0]["adv_acc_by_attack"] == {"a": None, "b": None}  # not measured on every sample
    # a attacks the 5 samples correct clean and fools 1 and 5; b attacks the other 3 and fools 3
    stats = cascade[0]["attack_stats"]
    assert (stats["a"]["attacked"], stats["a"]["fooled_only"], stats["b"]["attacked"], stats["b"]["fooled_only"]) == (
        5,
        2,
        3,
        1,
    )
    assert survivors({"m": cascade_outcome()}, RUNS[:1]) == {"m": {0, 3, 4}}
    broken = cascade_outcome()
    del broken.adv["b"][3]  # a survivor of a that b never attacked
    with pytest.raises(RuntimeError, match="has no b result for samples \\[3\\]"):
        worst_case_rows({"m": broken}, RUNS, {"a": {}, "b": {}}, independent=False)


@pytest.mark.parametrize(
    "text, message",
    [
        ("pgd", "at least two attacks"),
        ("pgd,pgd", "names an attack twice"),
        ("pgd,none", "clean accuracy is part of every worst case"),
        ("pgd,nope", "no attack named 'nope'"),
        ("pgd[steps=2,square", "unbalanced brackets"),
    ],
)
def test_bad_attack_lists_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_attacks(text)


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


@pytest.mark.slow
def test_worst_case_run_resumes_after_kills_to_the_uninterrupted_result(tmp_path, one_thread):
    reference = tmp_path / "ref"
    assert cli.main([*RUN, "--out", str(reference), "--cache-dir", str(tmp_path / "cache-ref")]) == 0
    summary = json.loads((reference / "summary.json").read_text())
    rows = {row["adapter"]: row for row in summary["rows"]}
    per_sample = [json.loads(line) for line in (reference / "worst_case_samples.jsonl").read_text().splitlines()]
    for adapter, row in rows.items():  # the summary is the AND of the attack folders' own records
        mine = [s for s in per_sample if s["adapter"] == adapter]
        assert row["worst_case_correct"] == sum(
            s["clean"] == s["label"] and all(p == s["label"] for p in s["adv"].values()) for s in mine
        )
        assert row["transfer_only"] is False
    entry = json.loads(next((reference / "model_info").rglob("*worst_case_ens.json")).read_text())
    from atpt_plugin.adapters.robustbench import import_robustbench

    import_robustbench()
    from robustbench.utils import ModelInfo

    assert {f.name for f in dataclasses.fields(ModelInfo)} <= set(entry)
    assert set(DEFENCE_FIELDS) <= set(entry["test_time_defence"]) and entry["worst_case_acc"] is not None
    assert entry["test_time_defence"]["views_per_image"] == 4 and entry["test_time_defence"]["tuning_steps"] == 0

    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "atpt_plugin.adapters.cli",
        *RUN,
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache-killed"),
    ]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    delays = random.Random(15)
    for _ in range(3):
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delays.uniform(3.0, 9.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert cli.main([*RUN, "--out", str(out), "--cache-dir", str(tmp_path / "cache-killed")]) == 0
    assert strip(json.loads((out / "summary.json").read_text())["rows"]) == strip(summary["rows"])
    assert (out / "worst_case_samples.jsonl").read_text() == (reference / "worst_case_samples.jsonl").read_text()
    attacked = {
        label: {row["adapter"]: row["attack_stats"][label]["attacked"] for row in summary["rows"]}
        for label in summary["attacks"]
    }
    for label, folder in zip(summary["attacks"], ("pgd_steps_2", "eot-pgd_steps_1_eot_iter_1", "square_n_queries_4")):
        lines = (out / "attacks" / folder / "samples.jsonl").read_text().splitlines()
        keys = [(json.loads(line)["adapter"], json.loads(line)["position"]) for line in lines]
        assert len(keys) == len(set(keys)) > 0  # nothing computed twice in any attack's records
        assert {a: sum(k[0] == a for k in keys) for a in attacked[label]} == attacked[label]  # survivors only
    clean = (out / "clean" / "samples.jsonl").read_text().splitlines()
    assert len(clean) == len({(json.loads(line)["adapter"], json.loads(line)["position"]) for line in clean}) == 12


def records(folder):
    lines = (folder / "samples.jsonl").read_text().splitlines()
    return {(r["adapter"], r["position"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_cascade_and_independent_runs_agree_per_sample_on_the_demo(tmp_path, one_thread):
    run = [*RUN, "--attacks", "pgd[steps=2],eot-pgd[steps=2,eot_iter=1],square[n_queries=8]"]
    for mode in ("cascade", "independent"):
        flags = ["--independent"] if mode == "independent" else []
        assert cli.main([*run, *flags, "--out", str(tmp_path / mode), "--cache-dir", str(tmp_path / "cache")]) == 0
    outcome = {}
    for mode in ("cascade", "independent"):
        lines = (tmp_path / mode / "worst_case_samples.jsonl").read_text().splitlines()
        outcome[mode] = {(s["adapter"], s["position"]): s["worst_case_correct"] for s in map(json.loads, lines)}
    assert outcome["cascade"] == outcome["independent"] and len(outcome["cascade"]) == 12
    assert 0 < sum(outcome["cascade"].values()) < 12  # some samples survive, some fall
    attacked = fewer = 0
    for folder in (tmp_path / "independent" / "attacks").iterdir():
        everything, survivors_only = records(folder), records(tmp_path / "cascade" / "attacks" / folder.name)
        assert set(survivors_only) <= set(everything)
        for key, record in survivors_only.items():  # a sample is attacked alike whatever else is attacked
            assert (record["clean"], record["adv"]) == (everything[key]["clean"], everything[key]["adv"])
        attacked += len(survivors_only)
        fewer += len(everything) - len(survivors_only)
    assert fewer > 0 and attacked > 0


def test_single_attack_rows_and_benchmark_table_carry_the_worst_case(tmp_path, one_thread):
    from atpt_plugin.adapters import benchmark_table

    from atpt_plugin.demo_model import load_demo_model

    model, tokenizer, _ = load_demo_model()
    rows = benchmark_table(
        ["zeroshot", "ens"],
        n_examples=6,
        dataset="demo",
        model=model,
        tokenizer=tokenizer,
        eps=8 / 255,
        steps=2,
        to_disk=True,
        model_info_dir=tmp_path / "info",
        overrides={"views": 4},
        cache_dir=tmp_path / "cache",
        log_path=tmp_path / "log",
    )
    records = [json.loads(line) for line in (tmp_path / "log" / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        mine = [r for r in records if r["adapter"] == row["adapter"]]
        assert row["worst_case_acc"] == pytest.approx(
            sum(r["clean"] == r["label"] == r["adv"] for r in mine) / len(mine)
        )
    board = (tmp_path / "info" / "leaderboard.md").read_text()
    order = sorted(rows, key=lambda r: (-r["worst_case_acc"], -r["clean_acc"]))
    assert board.index(f"| 1 | {order[0]['adapter']} |") < board.index(f"| 2 | {order[1]['adapter']} |")
    entry = json.loads(next((tmp_path / "info").rglob("*_ens.json")).read_text())
    assert (
        entry["test_time_defence"]["transfer_only"] is True
        and "pgd" in entry["test_time_defence"]["accuracy"]["transfer"]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attack", "pgd", "--independent"], "--attacks and --independent are for a worst case"),
        (["--attack", "pgd", "--attacks", "pgd,square"], "--attacks and --independent are for a worst case"),
        (["--attack", "worst", "--attacks", "pgd,square", "--attack-steps", "3"], "give each attack its own steps"),
    ],
)
def test_worst_case_flags_outside_a_worst_case_are_clear_errors(extra, message, tmp_path, capsys):
    args = ["eval", "--model", "fmnist-vit-tiny", "--adapters", "zeroshot", "--out", str(tmp_path / "never"), *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
