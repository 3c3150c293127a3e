"""Issue 24: per-record checksums and run checks in ResultLog, attack seconds that survive a resume,
clear messages for the inputs that used to end in a traceback or name the wrong thing, and
`atpt verify`. Fast tests use ResultLog and the parsers directly; the `slow` ones run
`atpt eval` on the embedded demo model (6 images, 2 attack steps, batches of 4)."""

import json
import shutil

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.device import resolve_device
from atpt_plugin.adapters.resultlog import (
    DamagedResultsError,
    RecordRules,
    ResultLog,
    record_checksum,
    settings_binding,
)
from atpt_plugin.adapters.rows import Row

LABELS = [3, 1, 4, 1]


def rules(attacked=True):
    return RecordRules(len(LABELS), LABELS.__getitem__, lambda p: f"img{p}", ("zeroshot",), attacked)


def written_log(tmp_path, attacked=True):
    """A results folder with run.json and one checksummed record per position."""
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"seed": 0, "model": "m"}, "info": {}}))
    log = ResultLog(tmp_path)
    for position, label in enumerate(LABELS):
        log.append(
            {
                "adapter": "zeroshot",
                "position": position,
                "id": f"img{position}",
                "label": label,
                "clean": label,
                "adv": 0,
            }
        )
    log.expect(rules(attacked))
    return log


def edit_line(path, index, change, rechecksum=False):
    lines = path.read_text().splitlines()
    record = json.loads(lines[index])
    change(record)
    if rechecksum:
        record["checksum"] = record_checksum(record, settings_binding(path.parent))
    lines[index] = json.dumps(record, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")


# ---- 1. per-record integrity ------------------------------------------------------------------
def test_untouched_records_verify(tmp_path):
    scan = written_log(tmp_path).checked()
    assert len(scan.records) == 4 and scan.rejected == [] and scan.damage == []
    assert all(r["checksum"] == record_checksum(r, settings_binding(tmp_path)) for r in scan.records)


@pytest.mark.parametrize(
    "change, rechecksum, why",
    [
        (lambda r: r.update(clean=9), False, "fails its checksum"),  # a flipped clean prediction
        (lambda r: r.update(adv=r["label"]), False, "fails its checksum"),  # a flipped adversarial one
        (lambda r: r.update(label=0), False, "fails its checksum"),  # a changed label
        (lambda r: r.pop("adv"), False, "fails its checksum"),  # the adversarial result removed
        (lambda r: r.update(label=0), True, "differs from the dataset's label 1"),  # ... with its checksum redone
        (lambda r: r.update(position=7, id="img7"), True, "position 7 does not exist"),
        (lambda r: r.pop("adv"), True, "has no adversarial prediction"),
        (lambda r: r.update(id="elsewhere.jpg"), True, "is not sample 1's"),
    ],
)
def test_each_kind_of_edit_is_rejected_with_file_and_line_and_never_counts(tmp_path, change, rechecksum, why):
    log = written_log(tmp_path)
    edit_line(log.path, 1, change, rechecksum)
    scan = log.checked()  # not an error: the record is recomputed
    assert [str(d) for d in scan.rejected] == [f"{log.path}:2: {d.why}" for d in scan.rejected]
    assert len(scan.rejected) == 1 and why in scan.rejected[0].why
    assert sorted(r["position"] for r in scan.records) == [0, 2, 3]
    log.append({"adapter": "zeroshot", "position": 1, "id": "img1", "label": 1, "clean": 1, "adv": 0})
    assert sorted(r["position"] for r in log.checked().records) == [0, 1, 2, 3]  # recomputed: no duplicate
    log.prepare(repair=True)  # --repair-results drops the rejected line
    assert log.path.read_text().count("\n") == 4 and log.checked().rejected == []


def test_settings_bind_the_checksums(tmp_path):
    written_log(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"seed": 1, "model": "m"}, "info": {}}))
    assert len(ResultLog(tmp_path).scan().rejected) == 4  # records of another run's settings


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda lines: lines.__setitem__(1, lines[1].replace('"clean"', '"klean"')), "'clean' is missing"),
        (lambda lines: lines.append(lines[2]), "recorded 2 times"),
        (lambda lines: lines.__setitem__(1, lines[1].split(', "checksum"')[0] + "}"), "--repair-results"),
    ],
)
def test_renamed_keys_duplicates_and_unchecksummed_lines_are_refused(tmp_path, edit, why):
    log = written_log(tmp_path)
    lines = log.path.read_text().splitlines()
    edit(lines)
    log.path.write_text("\n".join(lines) + "\n")
    before = log.path.read_bytes()
    with pytest.raises(DamagedResultsError, match="--repair-results") as caught:
        log.records()
    assert why in str(caught.value) and f"{log.path}:" in str(caught.value)
    assert log.path.read_bytes() == before


# ---- 2. attack seconds ------------------------------------------------------------------------
def test_transfer_attack_seconds_are_the_mean_over_records_and_earlier_ones_are_counted():
    from atpt_plugin.adapters.attacks import make_attack

    row = Row("zeroshot", attack=make_attack("pgd", steps=2))
    shares = [0.5, 0.25, 0.125]
    for i, share in enumerate(shares):
        row.add({"label": 1, "clean": 1, "adv": 0, "attack_seconds": share}, earlier=i < 2)
    row.add({"label": 1, "clean": 1, "adv": 0, "attack_seconds": None})  # an older record: not measured
    cost = row.attack_cost()
    assert cost["attack_seconds_per_image"] == pytest.approx(sum(shares) / len(shares))
    assert (cost["attack_seconds_measured"], cost["attack_seconds_measured_earlier"]) == (3, 2)


# ---- 4. devices ---------------------------------------------------------------------------------
def test_device_resolution_without_a_gpu(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:0: this machine has no usable CUDA device.*--device cpu"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="'gpu' is not a device: use auto, cpu, cuda"):
        resolve_device("gpu")


def eval_args(tmp_path, *change):
    return [
        "eval",
        "--adapters",
        "zeroshot",
        "--n-examples",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *change,
    ]


def one_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("atpt: error:")]
    assert len(errors) == 1, err
    return err


@pytest.mark.parametrize(
    "change, words",
    [
        (("--attack-opt", "steps=2"), ["--attack-opt steps=2", "use --attack-steps 2"]),
        (("--attack-opt", "eps=0.1"), ["--attack-opt eps=0.1", "use --eps (L-inf budgets there are in 1/255 units"]),
        (("--device", "cuda:0"), ["--device cuda:0", "no usable CUDA device", "--device cpu"]),
        # 5. messages that named the wrong thing
        (("--alpha", "-1"), ["--alpha must be > 0", "step size"]),
        (("--eps", "255"), ["--eps 255", "1/255 units", "below 127.5"]),
        (("--attack", "pgd[steps=-3]"), ["--attack pgd: steps must be a positive integer, got -3"]),
        (("--attack", "worst", "--attacks", "pgd[steps=-3]"), ["--attacks 'pgd[steps=-3]'", "got -3"]),
    ],
)
def test_bad_options_give_one_line_naming_option_value_and_fix(tmp_path, capsys, monkeypatch, change, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_error(capsys, cli.main(eval_args(tmp_path, *change)))
    for word in words:
        assert word in err, (word, err)
    assert "in Python" not in err and "needs two attacks" not in err and "no attack named" not in err
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_tokenizer_mistakes_are_clear(tiny_vit, tokenizer):
    from atpt_plugin import load_adapter

    with pytest.raises(ValueError, match="tokenizer= is a dict, not a tokenizer"):
        load_adapter("zeroshot").wrap(tiny_vit, classnames=["cat", "dog"], tokenizer={"not": "callable"})

    def too_large(texts):  # another model's ids: every word shifted past this model's 49408
        ids = tokenizer(texts)
        return ids + 49408 * (ids > 0)

    with pytest.raises(ValueError, match="beyond the text model's vocabulary: it is not this model's tokenizer"):
        load_adapter("zeroshot").wrap(tiny_vit, classnames=["cat", "dog"], tokenizer=too_large)


def test_hugging_face_folders_without_a_tokenizer_or_a_model_are_named(tmp_path, capsys):
    from test_families import make_hf_clip

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    err = one_error(capsys, cli.main(eval_args(tmp_path, "--model", f"hf:{empty}")))
    assert "no config.json" in err and "save_pretrained" in err
    bare = tmp_path / "no-tokenizer"
    make_hf_clip().save_pretrained(bare)
    err = one_error(capsys, cli.main(eval_args(tmp_path, "--model", f"hf:{bare}")))
    assert "no tokenizer" in err and "ctx_init" not in err
    with pytest.raises(ValueError, match="AutoTokenizer.from_pretrained"):
        from atpt_plugin import load_adapter

        load_adapter("zeroshot").wrap(make_hf_clip(), classnames=["cat"], tokenizer=None)


# ---- 6. help and listings -------------------------------------------------------------------------
def test_help_and_listing(capsys, monkeypatch):
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--steps," not in help_text and "name[key=value" in help_text
    monkeypatch.setenv("COLUMNS", "60")
    assert cli.main(["list", "adapters"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 60 and any("atpt_official" in line for line in lines)


def test_image_passes_are_counted_on_hugging_face_models():
    from atpt_plugin.adapters.progress import image_stem
    from test_families import make_hf_clip

    model = make_hf_clip()
    assert image_stem(model) is model.vision_model.embeddings.patch_embedding


# ---- end to end -------------------------------------------------------------------------------------
N = 6
RUN = ["eval", "--adapters", "zeroshot,rtpt", "--set", "views=4", "--n-examples", str(N), "--attack-steps", "2"]
RUN += ["--attack-batch-size", "4", "--no-progress"]
WALL_CLOCK = {"seconds", "attack_seconds", "seconds_per_image", "attack_seconds_per_image", "model_info", "checksum"}


def run(out, cache, capsys, *extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main([*RUN, "--out", str(out), "--cache-dir", str(cache), *extra])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.err


def rows(out):
    content = json.loads((out / "summary.json").read_text())
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK and "measured" not in k} for row in content["rows"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*RUN, "--out", str(root / "ref"), "--cache-dir", str(root / "cache")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "ref", root / "cache"


@pytest.mark.slow
def test_a_tampered_folder_reports_recomputes_and_resumes_to_the_same_numbers(tmp_path, reference, capsys):
    ref, cache = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    path = out / "samples.jsonl"
    original = path.read_text().splitlines()
    edit_line(path, 2, lambda r: r.update(clean=(r["clean"] + 1) % 10))  # checksum left stale
    edit_line(path, 5, lambda r: r.pop("adv"), rechecksum=True)
    edit_line(path, 7, lambda r: r.update(label=(r["label"] + 1) % 10), rechecksum=True)
    tampered = path.read_bytes()
    code, err = run(out, cache, capsys)
    assert code == 0 and "Traceback" not in err
    for line, why in ((3, "fails its checksum"), (6, "no adversarial prediction"), (8, "differs from the dataset")):
        assert f"samples.jsonl:{line}: " in err and why in err
    assert path.read_bytes().startswith(tampered)  # nothing stored is lost; the three are appended again
    assert rows(out) == rows(ref)
    integrity = json.loads((out / "summary.json").read_text())["integrity"]
    assert integrity["verified"] == 2 * N and len(integrity["rejected"]) == 3
    code, err = run(out, cache, capsys, "--repair-results")
    assert code == 0 and "dropped 3 damaged record(s)" in err
    kept = [line for i, line in enumerate(original) if i not in (2, 5, 7)]
    assert path.read_text().splitlines()[: len(kept)] == kept
    assert rows(out) == rows(ref)


@pytest.mark.slow
def test_resume_keeps_the_attack_seconds(tmp_path, reference, capsys):
    ref, cache = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-4]) + "\n")  # as if killed before the last batch
    code, err = run(out, cache, capsys)
    assert code == 0 and "resuming" in err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for row in json.loads((out / "summary.json").read_text())["rows"]:
        mine = [r["attack_seconds"] for r in records if r["adapter"] == row["adapter"]]
        assert row["attack_seconds_per_image"] == pytest.approx(sum(mine) / len(mine))
        assert row["attack_seconds_measured"] == N and row["attack_seconds_measured_earlier"] == N
    assert rows(out) == rows(ref)


def test_more_examples_than_the_dataset_holds_is_said_once(tmp_path, capsys):
    from PIL import Image

    for i, name in enumerate(["shirt", "bag", "shirt"]):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / "data" / name / f"{i}.png")
    args = ["eval", "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--adapters", "zeroshot"]
    args += ["--attack", "none", "--n-examples", "1000000", "--no-progress", "--out", str(tmp_path / "out")]
    code = cli.main([*args, "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("--n-examples 1000000 is more than") == 1 and "it has 3 images, and all 3 of them run" in err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"][0]["n"] == 3


@pytest.mark.slow
def test_verify_passes_untouched_and_names_a_forged_record(tmp_path, reference, capsys):
    ref, _ = reference
    assert cli.main(["verify", str(ref), "--n", "5"]) == 0
    assert "recomputed 5 record(s)" in capsys.readouterr().err
    out = tmp_path / "forged"
    shutil.copytree(ref, out)
    path = out / "samples.jsonl"
    index = next(i for i, line in enumerate(path.read_text().splitlines()) if json.loads(line)["adv"] is not None)
    record = json.loads(path.read_text().splitlines()[index])
    forged = (record["adv"] + 1) % 10
    edit_line(path, index, lambda r: r.update(adv=forged), rechecksum=True)  # checksum recomputed: looks valid
    assert len(ResultLog(out).checked().records) == 2 * N
    assert cli.main(["verify", str(out), "--n", str(2 * N)]) == 1
    captured = capsys.readouterr()
    assert f"samples.jsonl:{index + 1}: {record['adapter']} on sample {record['position']} does not reproduce" in (
        captured.out
    )
    assert f"adv: stored {forged}, recomputed {record['adv']}" in captured.out
    assert captured.out.count("does not reproduce") == 1


@pytest.mark.slow
def test_an_offline_pretrained_tag_prints_only_our_message(tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "atpt_plugin.adapters.cli", "eval", "--model", "ViT-B-32", "--pretrained", "openai"]
        + ["--adapters", "zeroshot", "--no-progress", "--out", str(tmp_path / "out")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "ERROR:root" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("atpt: error: the pretrained weights 'openai' of ViT-B-32 could not be fetched")


@pytest.mark.parametrize("second, forgiven", [(1.0 + 5e-5, True), (1.0 + 1e-2, False)])
def test_verify_forgives_only_near_ties(second, forgiven):
    """A prediction that differs only where the two classes' logits are within 1e-4 counts as reproduced."""
    from types import SimpleNamespace

    from atpt_plugin.adapters.verify import Recomputed, differences

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[1.0, second, -3.0]]).expand(len(images), 3)

    evaluation = SimpleNamespace(adapters={"a": Fixed()}, device=None)
    stored = {"adapter": "a", "position": 0, "id": "x", "label": 1, "clean": 0, "adv": 1}
    again = Recomputed({**stored, "clean": 1}, torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))
    assert differences(evaluation, stored, again) == ([] if forgiven else ["clean: stored 0, recomputed 1"])
    assert differences(evaluation, stored, Recomputed({**stored, "label": 2}, again.image, None)) == [
        "label: stored 1, recomputed 2"
    ]
