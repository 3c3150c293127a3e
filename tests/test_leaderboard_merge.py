"""`atpt leaderboard`: real tiny runs (two datasets, two eps, a clean run, a worst case, a
partial run) merged: comparable runs averaged, the others in tables of their own, partial
runs marked, the CSV and JSON equal to the runs' own summaries, Wilson intervals."""

import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.leaderboard_files import entry
from atpt_plugin.adapters.merge import Row, Table, load_tables, wilson
from atpt_plugin.adapters.run_folders import AdapterResult, AttackInfo, RunResult
from tiny_runs import N_IMAGES, make_workspace, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("leaderboard"))
    made = {
        "pets4": run_eval(root, "runs/pets4", "pets", "4"),
        "folder4": run_eval(root, "runs/folder4", "imagefolder", "4"),
        "pets8": run_eval(root, "runs/pets8", "pets", "8"),
        "clean": run_eval(root, "runs/clean", "pets", None, "--attack", "none"),
        "worst": run_eval(root, "runs/worst", "pets", "4", "--attack", "worst", "--attacks", "pgd[steps=2],fgsm"),
    }
    # a partial run: the imagefolder at eps 8, killed after 3 records (no summary yet)
    partial = run_eval(root, "runs/folder8", "imagefolder", "8")
    lines = (partial / "samples.jsonl").read_bytes().splitlines(keepends=True)
    (partial / "samples.jsonl").write_bytes(b"".join(lines[:3]))
    (partial / "summary.json").unlink()
    shutil.rmtree(partial / "model_info")
    made["folder8"] = partial
    return root, made


def summary_rows(path):
    return {row["adapter"]: row for row in json.loads((path / "summary.json").read_text())["rows"]}


def table_holding(tables, path):
    return next(t for t in tables if any(run.path == path for run in t.runs))


@pytest.mark.slow
def test_comparable_runs_share_a_table_and_their_average(runs):
    root, made = runs
    tables = load_tables([root / "runs"])  # a parent folder: its runs are found, attack folders not listed
    assert sorted(str(run.path) for t in tables for run in t.runs) == sorted(map(str, made.values()))
    table = table_holding(tables, made["pets4"])
    assert {run.path for run in table.runs} == {made["pets4"], made["folder4"]}
    assert sorted(table.datasets) == ["imagefolder", "pets"]
    pets, folder = summary_rows(made["pets4"]), summary_rows(made["folder4"])
    for row in table.rows:
        for metric, field in (("clean", "clean_acc"), ("pgd", "adv_acc"), ("worst case", "worst_case_acc")):
            expected = (pets[row.adapter][field] + folder[row.adapter][field]) / 2
            assert row.cells[("average", metric)].value == pytest.approx(expected)
            assert row.cells[("pets", metric)].value == pets[row.adapter][field]
        assert row.seconds_per_image == pytest.approx(
            (pets[row.adapter]["seconds_per_image"] + folder[row.adapter]["seconds_per_image"]) / 2
        )
    assert table.differs == ["eps", "attacks"]  # the pets4 table shares backbone and images with every other


@pytest.mark.slow
def test_runs_that_differ_are_never_averaged_and_the_difference_is_named(runs):
    root, made = runs
    tables = load_tables([root / "runs"])
    eps8 = table_holding(tables, made["pets8"])
    assert {run.path for run in eps8.runs} == {made["pets8"], made["folder8"]}
    assert eps8.compared["eps"] == "8/255" and "eps" in eps8.differs
    clean = table_holding(tables, made["clean"])
    assert [run.path for run in clean.runs] == [made["clean"]] and clean.metrics == ["clean"]
    assert clean.compared["attacks"] == "none (clean only)"
    worst = table_holding(tables, made["worst"])
    assert worst.metrics == ["clean", "pgd[steps=2]", "fgsm", "worst case"]
    assert "attacks" in worst.differs
    expected = {row["adapter"]: row for row in json.loads((made["worst"] / "summary.json").read_text())["rows"]}
    for row in worst.rows:
        assert row.cells[("pets", "worst case")].value == expected[row.adapter]["worst_case_acc"]
        assert row.cells[("pets", "fgsm")].value == expected[row.adapter]["adv_acc_by_attack"]["fgsm"]


@pytest.mark.slow
def test_a_partial_run_is_marked_with_the_images_it_covers(runs, tmp_path):
    root, made = runs
    out = tmp_path / "board"
    assert cli.main(["leaderboard", str(root / "runs"), "--out", str(out)]) == 0
    table = table_holding(load_tables([root / "runs"]), made["folder8"])
    records = [json.loads(line) for line in (made["folder8"] / "samples.jsonl").read_text().splitlines()]
    for row in table.rows:
        mine = [r for r in records if r["adapter"] == row.adapter]
        if not mine:
            assert "imagefolder" not in row.results
            continue
        cell = row.cells[("imagefolder", "clean")]
        assert cell.partial and cell.n == len(mine)
        assert cell.value == pytest.approx(sum(r["clean"] == r["label"] for r in mine) / len(mine))
        assert row.cells[("average", "clean")].partial
    text = (out / "leaderboard.md").read_text()
    assert f"partial run (imagefolder, 3 of {N_IMAGES} images evaluated)" in text and "*" in text
    lines = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    partial_lines = [line for line in lines if line["run"] == str(made["folder8"])]
    assert partial_lines and all(line["partial"] == "1" for line in partial_lines)
    board = json.loads((out / "leaderboard.json").read_text())
    partial_entries = [e for e in board if e["leaderboard"]["run"] == str(made["folder8"])]
    assert partial_entries and all(e["leaderboard"]["partial"] for e in partial_entries)
    assert all("Partial run" in e["footnote"] for e in partial_entries)


@pytest.mark.slow
def test_csv_and_json_agree_with_the_runs_summaries(runs, tmp_path):
    root, made = runs
    out = tmp_path / "board"
    assert cli.main(["leaderboard", *(str(made[k]) for k in ("pets4", "folder4", "worst")), "--out", str(out)]) == 0
    lines = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    board = json.loads((out / "leaderboard.json").read_text())
    assert len(board) == 3 * 2  # one entry per adapter and dataset of each run
    for key, metrics in (
        ("pets4", {"clean": "clean_acc", "pgd": "adv_acc", "worst case": "worst_case_acc"}),
        ("folder4", {"clean": "clean_acc", "pgd": "adv_acc"}),
    ):
        for adapter, row in summary_rows(made[key]).items():
            for metric, field in metrics.items():
                found = [
                    line
                    for line in lines
                    if line["run"] == str(made[key]) and line["adapter"] == adapter and line["metric"] == metric
                ]
                assert len(found) == 1 and float(found[0]["value"]) == row[field]
                low, high = wilson(round(row[field] * row["n"]), row["n"])
                assert (float(found[0]["ci95_low"]), float(found[0]["ci95_high"])) == (low, high)
            own = json.loads((made[key] / "model_info").rglob(f"*_{adapter}.json").__next__().read_text())
            merged = next(e for e in board if e["leaderboard"]["run"] == str(made[key]) and e["name"] == own["name"])
            assert merged["clean_acc"] == own["clean_acc"] == str(round(100 * row["clean_acc"], 2))
            assert merged["pgd_acc"] == own["pgd_acc"] and merged["autoattack_acc"] is None
            assert "autoattack_acc is empty" in merged["footnote"]
    worst = summary_rows(made["worst"])
    for e in (e for e in board if e["leaderboard"]["run"] == str(made["worst"])):
        adapter = e["leaderboard"]["row"]
        assert e["worst_case_acc"] == str(round(100 * worst[adapter]["worst_case_acc"], 2))


def reference_wilson(k, n, z=1.959963984540054):
    """The interval's ends as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    phat = k / n
    a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (63, 100), (1, 1), (500, 1000)])
def test_wilson_interval_against_the_quadratic_it_solves(k, n):
    low, high = wilson(k, n)
    ref_low, ref_high = reference_wilson(k, n)
    assert low == pytest.approx(max(0, ref_low), abs=1e-12) and high == pytest.approx(min(1, ref_high), abs=1e-12)
    assert low <= k / n <= high


def test_autoattack_acc_is_filled_from_an_apgd_attack():
    attacks = [
        AttackInfo("pgd", "pgd", "transfer", {"eps": 4 / 255}),
        AttackInfo("apgd-eot", "apgd-eot", "adaptive", {}),
    ]
    result = AdapterResult("atpt", {}, 50, 0.8, {"pgd": 0.6, "apgd-eot": 0.42}, 0.4)
    run = RunResult(Path("r"), "worst", True, "pets", "ViT-B-16", "openai", 50, attacks, {"atpt": result})
    row = Row("atpt", "atpt", {}, {"pets": (result, run)})
    table = Table({}, [run], ["pets"], ["clean", "pgd", "apgd-eot", "worst case"], [], [row])
    made = entry(result, run, row, "pets", 1, table)
    assert made["autoattack_acc"] == "42.0" and "apgd-eot" in made["footnote"]
    assert made["worst_case_acc"] == "40.0" and made["clean_acc"] == "80.0"


def test_a_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["leaderboard", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "holds no `atpt eval` run" in capsys.readouterr().err


def synthetic_run(path, dataset, eps, results, finished=True):
    attacks = [AttackInfo("pgd", "pgd", "transfer", {"name": "pgd", "eps": eps, "norm": "Linf", "steps": 20})]
    return RunResult(Path(path), "single", finished, dataset, "ViT-B-16", "openai", 100, attacks, results, "cuda:0")


def test_tables_from_records_without_runs_ece_settings_and_averages():
    def result(name, clean, adv, config, ece=None):
        return AdapterResult(name, config, 100, clean, {"pgd": adv}, adv, ece or {}, 0.5, 64)

    runs = [
        synthetic_run(
            "a",
            "pets",
            4 / 255,
            {"ens": result("ens", 0.8, 0.6, {"views": 64, "domain_word": "pet"}, {"clean": 0.05, "pgd": 0.2})},
        ),
        synthetic_run(
            "b", "imagefolder", 4 / 255, {"ens": result("ens", 0.6, 0.3, {"views": 64, "domain_word": None})}
        ),
        synthetic_run("c", "pets", 4 / 255, {"ens": result("ens", 0.7, 0.5, {"views": 16, "domain_word": "pet"})}),
        synthetic_run("d", "pets", 8 / 255, {"ens": result("ens", 0.8, 0.1, {"views": 64, "domain_word": "pet"})}),
    ]
    from atpt_plugin.adapters.leaderboard_files import markdown
    from atpt_plugin.adapters.merge import build_tables

    tables = build_tables(runs)
    assert [sorted(str(r.path) for r in t.runs) for t in tables] == [["a", "b", "c"], ["d"]]
    assert tables[0].differs == tables[1].differs == ["eps"]
    rows = {row.label: row for row in tables[0].rows}
    assert sorted(rows) == ["ens [views=16]", "ens [views=64]"]
    full = rows["ens [views=64]"].cells
    assert full[("average", "pgd")].value == pytest.approx(0.45)
    half = 1.959963984540054 * math.sqrt(0.6 * 0.4 / 100 + 0.3 * 0.7 / 100) / 2
    assert (full[("average", "pgd")].low, full[("average", "pgd")].high) == pytest.approx((0.45 - half, 0.45 + half))
    assert rows["ens [views=16]"].cells[("average", "pgd")].value is None  # not on the image folder: no average
    assert tables[0].ece_metrics == ["clean", "pgd"]
    text = markdown(tables)
    assert "pets: ECE clean (%)" in text and "| 5.0 | 20.0 |" in text  # ECE x100, no interval
    assert "Differs from the other tables in: eps." in text
