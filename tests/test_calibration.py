"""Expected calibration error as the C-TPT / O-TPT code computes it, and where it is shown:
records, rows (summed over processes), results.md / results.csv and leaderboard entries."""

import pytest
import torch
from atpt_plugin.adapters.attacks import ZeroShotClassifier, make_attack
from atpt_plugin.adapters.calibration import CalibrationBins, bin_index, expected_calibration_error
from atpt_plugin.adapters.leaderboard import leaderboard_markdown, model_info
from atpt_plugin.adapters.report import csv_table, markdown_table
from atpt_plugin.adapters.rows import Row
from conftest import CLASSNAMES

# rivals.md §4: (confidence, correct)
FIXTURE = [(0.96, 1), (1.00, 1), (0.56, 0), (0.58, 1), (0.72, 0), (0.75, 1)]


def reference_ece(pairs, bins):
    """The repositories' loop: bins (lower, upper] from linspace edges, |acc - conf| weighted by share."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64).tolist()
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        inside = [(c, y) for c, y in pairs if lower < c <= upper]
        if inside:
            accuracy = sum(y for _, y in inside) / len(inside)
            confidence = sum(c for c, _ in inside) / len(inside)
            total += len(inside) / len(pairs) * abs(accuracy - confidence)
    return total


def test_hand_worked_fixture_tells_the_bin_conventions_apart():
    confidences, correct = zip(*FIXTURE)
    assert 100 * expected_calibration_error(confidences, correct) == pytest.approx(10.83, abs=5e-3)
    assert expected_calibration_error(confidences, correct, bins=20) == pytest.approx(0.65 / 6, abs=1e-12)
    assert expected_calibration_error(confidences, correct, bins=15) == pytest.approx(1.15 / 6, abs=1e-12)
    assert 100 * expected_calibration_error(confidences, correct, bins=15) == pytest.approx(19.17, abs=5e-3)


def test_edges_go_to_the_lower_bin():
    assert [bin_index(c, 20) for c in (0.25, 0.5, 0.75, 1.0)] == [4, 9, 14, 19]
    assert [bin_index(c, 20) for c in (0.2500001, 1e-9, 0.0)] == [5, 0, 0]
    assert bin_index(1.0, 15) == 14


@pytest.mark.parametrize("bins", [20, 15, 10])
def test_equals_the_reference_loop_on_random_predictions(bins):
    generator = torch.Generator().manual_seed(bins)
    confidences = (0.25 + 0.75 * torch.rand(200, generator=generator, dtype=torch.float64)).tolist()
    correct = (torch.rand(200, generator=generator) < 0.7).long().tolist()
    expected = reference_ece(list(zip(confidences, correct)), bins)
    assert expected_calibration_error(confidences, correct, bins) == pytest.approx(expected, abs=1e-12)


def test_perfect_calibration_is_zero_and_bad_bin_counts_are_refused():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0 and expected_calibration_error([], []) is None
    with pytest.raises(ValueError, match="bin count must be an integer >= 1"):
        CalibrationBins(0)


def record(position, confidence, correct, adv_confidence=None, adv_correct=None):
    return {
        "position": position,
        "label": 1,
        "clean": 1 if correct else 0,
        "clean_confidence": confidence,
        "adv": None if adv_correct is None else (1 if adv_correct else 0),
        "adv_confidence": adv_confidence,
    }


def fixture_records():
    reversed_pairs = FIXTURE[::-1]  # the adversarial side: another pairing of the same values
    return [record(i, c, y, *reversed_pairs[i]) for i, (c, y) in enumerate(FIXTURE)]


def test_rows_summed_over_shards_give_the_ece_of_all_records():
    whole, shards = Row("a"), [Row("a"), Row("a")]
    for i, r in enumerate(fixture_records()):
        whole.add(r)
        shards[i % 2].add(r)
    summed = Row("a")
    for shard in shards:
        summed.n += shard.n
    summed.load_calibration_vector([a + b for a, b in zip(*(s.calibration_vector() for s in shards))])
    assert summed.clean_ece == whole.clean_ece == pytest.approx(0.65 / 6)
    adv_pairs = FIXTURE[::-1]
    assert summed.adv_ece == whole.adv_ece == pytest.approx(expected_calibration_error(*zip(*adv_pairs)))
    assert whole.as_dict()["clean_ece"] == pytest.approx(0.65 / 6) and whole.as_dict()["ece_bins"] == 20


def test_ece_is_none_where_a_record_has_no_confidence_or_there_is_no_attack():
    row = Row("a")
    for r in fixture_records():
        row.add(r)
    row.add({"position": 9, "label": 0, "clean": 0, "adv": 0})  # a record from before confidences
    assert row.as_dict()["clean_ece"] is None and row.as_dict()["adv_ece"] is None
    clean_only = Row("b", attacked=False)
    clean_only.add(record(0, 0.9, True))
    assert clean_only.clean_ece == pytest.approx(0.1) and clean_only.adv_ece is None


def test_tables_and_leaderboard_entries_show_ece_in_percent():
    row = Row("calibrated", attack=make_attack("pgd", eps=4 / 255, steps=2))
    for r in fixture_records():
        row.add(r)
    shown = row.as_dict()
    table = markdown_table([shown])
    header, _, line = table.splitlines()[:3]
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["clean ECE (%)"] == "10.83" and cells["adv ECE (%)"] == f"{100 * shown['adv_ece']:.2f}"
    csv_header, csv_row = csv_table([shown]).splitlines()
    values = dict(zip(csv_header.split(","), csv_row.split(",")))
    assert float(values["clean_ece"]) == pytest.approx(0.65 / 6)
    entry = model_info(
        dataset="demo", attack=row.attack, clean_acc=0.5, adv_acc=0.5, adapter="calibrated", n_examples=6, row=shown
    )
    assert entry["clean_ece"] == "10.83" and entry["adv_ece"] == str(round(100 * shown["adv_ece"], 2))
    unmeasured = model_info(
        dataset="demo", attack=row.attack, clean_acc=0.5, adv_acc=0.5, adapter="x", n_examples=6, row={}
    )
    assert "clean_ece" not in unmeasured
    assert "| 10.83 |" in leaderboard_markdown([shown])


def test_evaluation_records_the_top1_confidence_of_each_prediction(tiny_vit, tokenizer):
    from atpt_plugin.adapters.runner import Evaluation
    from atpt_plugin.adapters.sources import TensorSource

    from atpt_plugin import load_adapter

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    adapter = load_adapter("zeroshot").wrap(tiny_vit, CLASSNAMES, tokenizer)
    zero_shot = ZeroShotClassifier.build(tiny_vit, CLASSNAMES, tokenizer)
    spec = make_attack("pgd", eps=8 / 255, steps=2)
    evaluation = Evaluation(
        {"zs": adapter}, TensorSource(x, y), spec, zero_shot, None, attack_batch_size=2, ece_bins=10
    )
    (row,) = evaluation.run()
    records = sorted(evaluation.log.records(), key=lambda r: r["position"])
    with torch.no_grad():
        expected = adapter(x).softmax(-1).max(-1).values.tolist()
    assert [r["clean_confidence"] for r in records] == pytest.approx(expected, rel=1e-6)
    assert all(0 < r["adv_confidence"] <= 1 for r in records)
    clean = expected_calibration_error(expected, [r["clean"] == r["label"] for r in records], bins=10)
    adv = expected_calibration_error(
        [r["adv_confidence"] for r in records], [r["adv"] == r["label"] for r in records], bins=10
    )
    assert row.as_dict()["clean_ece"] == pytest.approx(clean) and row.as_dict()["adv_ece"] == pytest.approx(adv)
