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
from atpt_plugin.adapters.resultlog import ResultLog
from atpt_plugin.adapters.worst_case import (
    AdapterOutcome,
    AttackRun,
    collect,
    markdown,
    parse_attacks,
    survivors,
    worst_case_rows,
    write,
)

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
    "attack_seconds",  # a record's share of its batch's attack time
    "checksum",  # over a record's seconds too
    "attack_seconds_measured_earlier",  # how many were measured before a kill: the resume's history
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


def write_records(folder, records):
    """records: [(adapter, position, label, clean, adv)], appended to `folder` as a run would."""
    log = ResultLog(folder)
    log.directory.mkdir(parents=True)
    for adapter, position, label, clean, adv in records:
        log.append({"adapter": adapter, "position": position, "id": f"s{position}", "label": label, "clean": clean,
                    "adv": adv})  # fmt: skip


def write_run_records(out, runs, clean, records):
    """The clean pass's records (clean: [(adapter, position, label, clean)]) and each attack's."""
    write_records(out / "clean", [(*record, None) for record in clean])
    for run in runs:
        write_records(out / "attacks" / run.folder, records[run.label])


def test_collect_reads_each_attack_folders_adversarial_predictions(tmp_path):
    """The worst case from records written to the clean and attack folders: a robust sample must be
    correct clean AND under every attack; a sample an attack has not seen yet is an error."""
    runs = [AttackRun("pgd[steps=2]", "pgd", {"steps": 2}), AttackRun("square", "square", {})]
    clean = {"m": [1, 2, 0, 1, 2, 0], "z": [1, 0, 0, 1, 2, 1]}
    labels = [1, 2, 0, 1, 2, 0]
    adv = {  # "m" is right clean everywhere; each attack breaks different samples
        "pgd[steps=2]": {"m": [1, 0, 0, 1, 1, 0], "z": [1, 0, 0, 2, 2, 1]},
        "square": {"m": [0, 2, 1, 1, 2, 0], "z": [1, 0, 0, 1, 0, 1]},
    }
    records = {
        label: [(a, p, labels[p], clean[a][p], adv[label][a][p]) for a in ("m", "z") for p in range(6)] for label in adv
    }
    clean_records = [(a, p, labels[p], clean[a][p]) for a in ("m", "z") for p in range(6)]
    write_run_records(tmp_path, runs, clean_records, records)
    attack_rows = {
        "pgd[steps=2]": {a: {"attack_kind": "transfer", "warnings": [f"{a} pgd"]} for a in ("m", "z")},
        "square": {"m": {"attack_kind": "adaptive", "warnings": ["m square"]}, "z": {"attack_kind": "transfer"}},
    }

    outcomes = collect(tmp_path, runs)
    assert {name: outcome.adapter for name, outcome in outcomes.items()} == {"m": "m", "z": "z"}
    rows, samples = worst_case_rows(outcomes, runs, attack_rows)

    by_adapter = {row["adapter"]: row for row in rows}
    assert by_adapter["m"]["attack_kinds"] == {"pgd[steps=2]": "transfer", "square": "adaptive"}
    assert by_adapter["m"]["warnings"] == ["pgd[steps=2]: m pgd", "square: m square"]
    assert by_adapter["m"]["transfer_only"] is False and by_adapter["z"]["transfer_only"] is True
    assert {"adapter": "m", "position": 1, "label": 2, "clean": 2, "adv": {"pgd[steps=2]": 0, "square": 2},
            "fooled_by": ["pgd[steps=2]"], "worst_case_correct": False} in samples  # fmt: skip
    for adapter in ("m", "z"):
        positions = list(range(6))
        robust = [
            p for p in positions if clean[adapter][p] == labels[p] and all(adv[a][adapter][p] == labels[p] for a in adv)
        ]
        row = by_adapter[adapter]
        assert row["n"] == len(positions)
        assert row["worst_case_correct"] == len(robust)
        assert row["worst_case_acc"] == pytest.approx(len(robust) / len(positions))
        assert row["clean_acc"] == pytest.approx(
            sum(clean[adapter][p] == labels[p] for p in positions) / len(positions)
        )
        for attack in adv:
            expected = sum(adv[attack][adapter][p] == labels[p] for p in positions) / len(positions)
            assert row["adv_acc_by_attack"][attack] == pytest.approx(expected)
        mine = {s["position"]: s for s in samples if s["adapter"] == adapter}
        assert sorted(mine) == positions
        assert [p for p in positions if mine[p]["worst_case_correct"]] == robust
        assert all(mine[p]["adv"] == {a: adv[a][adapter][p] for a in adv} for p in positions)
    assert (
        by_adapter["m"]["worst_case_correct"] == 2 and by_adapter["m"]["clean_acc"] == 1.0
    )  # the worst case is not clean

    partial = tmp_path / "partial"  # ("z", 5) not yet attacked by pgd: no worst case is claimed for z
    records["pgd[steps=2]"] = [r for r in records["pgd[steps=2]"] if (r[0], r[1]) != ("z", 5)]
    write_run_records(partial, runs, clean_records, records)
    with pytest.raises(RuntimeError, match="z has no pgd\\[steps=2\\] result for samples \\[5\\]"):
        worst_case_rows(collect(partial, runs), runs, attack_rows)


def test_collect_refuses_attack_runs_that_disagree_on_the_clean_prediction(tmp_path):
    runs = [AttackRun("a", "pgd", {}), AttackRun("b", "square", {})]
    write_run_records(tmp_path, runs, [("m", 0, 1, 1)], {"a": [("m", 0, 1, 1, 0)], "b": [("m", 0, 1, 2, 0)]})
    with pytest.raises(RuntimeError, match="do not share their settings"):
        collect(tmp_path, runs)


def test_written_table_and_files_state_the_computed_figures(tmp_path):
    """results.md: one line per adapter, best worst case first, each figure x100 to one decimal,
    then each attack's cost; summary.json and worst_case_samples.jsonl hold the rows and records."""
    runs = [AttackRun("pgd[steps=2]", "pgd", {"steps": 2}), AttackRun("square", "square", {})]
    stats = {"pgd[steps=2]": {"attacked": 8, "fooled_only": 2, "seconds": 1.25},
             "square": {"attacked": 8, "fooled_only": 1, "seconds": 30.0}}  # fmt: skip
    none = {"pgd[steps=2]": {"attacked": 0, "fooled_only": 0, "seconds": 0.0},
            "square": {"attacked": 0, "fooled_only": 0, "seconds": 0.0}}  # fmt: skip
    rows = [
        {"adapter": "low", "n": 8, "clean_acc": 0.875, "adv_acc_by_attack": {"pgd[steps=2]": 0.5, "square": 0.25},
         "worst_case_acc": 0.125, "attack_stats": stats, "warnings": ["square: too few queries"]},
        {"adapter": "high", "n": 8, "clean_acc": 0.75, "adv_acc_by_attack": {"pgd[steps=2]": 0.625, "square": None},
         "worst_case_acc": 0.375, "attack_stats": stats, "warnings": []},
        {"adapter": "none", "n": 0, "clean_acc": None, "adv_acc_by_attack": {"pgd[steps=2]": None, "square": None},
         "worst_case_acc": None, "attack_stats": none, "warnings": []},
    ]  # fmt: skip
    samples = [{"adapter": "low", "position": 3, "worst_case_correct": True}, {"adapter": "high", "position": 0}]
    paths = write(tmp_path, rows, samples, runs, "Demo, eps 8/255", {"eps": 8 / 255})
    assert [p.name for p in paths] == ["summary.json", "results.md", "worst_case_samples.jsonl"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "rows": rows,
        "caption": "Demo, eps 8/255",
        "attacks": ["pgd[steps=2]", "square"],
        "mode": "independent",
        "eps": 8 / 255,
    }
    assert [json.loads(line) for line in (tmp_path / "worst_case_samples.jsonl").read_text().splitlines()] == samples
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[:4] == [
        "Demo, eps 8/255",
        "",
        "| adapter | n | clean (%) | pgd[steps=2] (%) | square (%) | worst case (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    assert lines[4:7] == [
        "| high | 8 | 75.0 | 62.5 | - | **37.5** |",
        "| low | 8 | 87.5 | 50.0 | 25.0 | **12.5** |",
        "| none | 0 | - | - | - | **-** |",
    ]
    assert "| low | 8 / 2 / 1.2 | 8 / 1 / 30.0 |" in lines
    assert lines[-3:] == [
        "",
        "Sanity-check warnings (the attack may not work on that adapter):",
        "- square: too few queries",
    ]
    bare = markdown(rows[1:2], runs)  # no caption, no warnings: the tables alone
    assert bare.splitlines()[:3] == lines[2:5]


def test_attack_lists_parse_into_labels_names_settings_and_folders():
    runs = parse_attacks(" pgd[steps = 2],, square ,")
    assert [(r.label, r.name, r.settings, r.folder) for r in runs] == [
        ("pgd[steps=2]", "pgd", {"steps": 2}, "pgd_steps_2"),
        ("square", "square", {}, "square"),
    ]
    with pytest.raises(ValueError, match="needs --attacks"):
        parse_attacks(None)
    with pytest.raises(ValueError, match="needs --attacks"):
        parse_attacks("  ")


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
    correct = {}  # (adapter, position) -> correct clean and under every attack so far
    for folder in (reference / "attacks").iterdir():  # the summary is the AND of the attack folders' own records
        for line in (folder / "samples.jsonl").read_text().splitlines():
            r = json.loads(line)
            key = (r["adapter"], r["position"])
            correct[key] = correct.get(key, True) and r["clean"] == r["label"] and r["adv"] == r["label"]
    for adapter, row in rows.items():
        assert row["worst_case_correct"] == sum(ok for (a, _), ok in correct.items() if a == adapter)
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
