"""`atpt eval` end to end on a tiny on-disk dataset: outputs, resume after a kill, 2 processes, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.manifest import lock_folder
from PIL import Image

ADAPTERS = "atpt,zeroshot"
N_IMAGES = 7
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A CoOp-layout OxfordPets with 7 test images of 3 classes, and a tiny model config."""
    root = tmp_path_factory.mktemp("eval_cli")
    base = root / "data" / "oxford_pets"
    (base / "images").mkdir(parents=True)
    names = ["abyssinian", "american_bulldog", "beagle"]
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(N_IMAGES + 2):
        label = i % 3
        pixels = (torch.rand(30 + i, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(base / "images" / f"{names[label]}_{i}.jpg")
        items.append([f"{names[label]}_{i}.jpg", label, names[label]])
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": items[:2], "val": [], "test": items}))
    (root / "tiny-vit-eval.json").write_text(json.dumps(TINY_CONFIG))
    return root


def eval_args(root, out, *extra):
    return [
        "eval",
        "--model",
        str(root / "tiny-vit-eval.json"),
        "--pretrained",
        "none",
        "--dataset",
        "pets",
        "--data-root",
        str(root / "data"),
        "--adapters",
        ADAPTERS,
        "--set",
        "views=4",
        "--set",
        "rho=0.25",
        "--attack",
        "pgd",
        "--eps",
        "4",
        "--attack-steps",
        "2",
        "--n-examples",
        str(N_IMAGES),
        "--attack-batch-size",
        "3",
        "--out",
        str(root / out),
        "--cache-dir",
        str(root / f"cache-{out}"),
        "--no-progress",
        *extra,
    ]


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(root, args, timeout=600):
    done = subprocess.run(
        [sys.executable, "-m", "atpt_plugin.adapters.cli", *args],
        cwd=root,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out):
    lines = []
    for path in sorted(out.glob("samples*.jsonl")):
        data = path.read_text()
        assert data.endswith("\n")
        lines += [json.loads(line) for line in data.splitlines()]
    return lines


def predictions(out):
    found = records(out)
    counts = Counter((r["adapter"], r["position"]) for r in found)
    assert max(counts.values()) == 1, "a sample was computed twice"
    assert set(counts) == {(a, p) for a in ADAPTERS.split(",") for p in range(N_IMAGES)}, "a sample is missing"
    return {(r["adapter"], r["position"]): (r["id"], r["label"], r["clean"], r["adv"]) for r in found}


def accuracies(out):
    rows = json.loads((out / "summary.json").read_text())["rows"]
    return [(row["adapter"], row["n"], row["clean_acc"], row["adv_acc"]) for row in rows]


@pytest.fixture(scope="module")
def reference(workspace):
    """One uninterrupted single-process run (the other tests compare against it)."""
    done = run_cli(workspace, eval_args(workspace, "ref"))
    return workspace / "ref", done


@pytest.mark.slow
def test_end_to_end_outputs(workspace, reference):
    out, done = reference
    assert "| adapter | n | clean acc (%) | adv acc (%)" in done.stdout
    for name in ("run.json", "samples.jsonl", "summary.json", "results.md", "results.csv", "results.png"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["adapter"]: row for row in summary["rows"]}
    found = predictions(out)
    for adapter in ADAPTERS.split(","):
        mine = [v for (a, _), v in found.items() if a == adapter]
        assert rows[adapter]["n"] == N_IMAGES
        assert rows[adapter]["clean_acc"] == pytest.approx(sum(c == y for _, y, c, _ in mine) / N_IMAGES)
        assert rows[adapter]["adv_acc"] == pytest.approx(sum(a == y for _, y, _, a in mine) / N_IMAGES)
        entry = json.loads((out / f"model_info/pets/Linf/tiny-vit-eval-none_{adapter}.json").read_text())
        assert entry["clean_acc"] == str(round(100 * rows[adapter]["clean_acc"], 2)) and "pgd_acc" in entry
        assert rows[adapter]["attack_kind"] == "transfer" and rows[adapter]["attack_shared"]
        assert rows[adapter]["attack_forward_per_image"] == rows[adapter]["attack_backward_per_image"] == 2
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("adapter,n,clean_acc,adv_acc") and len(csv_lines) == 3
    assert summary["attack"]["kind"] == "transfer" and summary["warnings"] == []
    assert "pgd (transfer, shared)" in (out / "results.md").read_text()
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["attack"]["eps"] == pytest.approx(4 / 255) and settings["attacked_prompt"] == "a pet photo of a"
    assert settings["adapters"]["atpt"]["domain_word"] == "pet" and settings["adapters"]["atpt"]["views"] == 4


@pytest.mark.slow
def test_cli_predictions_equal_the_library_called_directly(workspace, reference):
    import open_clip
    from atpt_plugin.adapters.datasets import load_dataset

    from atpt_plugin import load_adapter

    open_clip.add_model_config(workspace / "tiny-vit-eval.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-eval", pretrained=None).eval()
    dataset = load_dataset("pets", workspace / "data", image_size=32)
    index = {dataset.sample_id(i): i for i in range(len(dataset))}
    tta = load_adapter("atpt", views=4, rho=0.25, seed=0, domain_word="pet").wrap(
        model, classnames=dataset.classnames, tokenizer=open_clip.get_tokenizer("tiny-vit-eval")
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (adapter, _), (sample_id, label, clean, _) in predictions(reference[0]).items():
            if adapter == "atpt":
                image, expected_label = dataset[index[sample_id]]
                with torch.no_grad():
                    assert int(tta(image[None]).argmax()) == clean and expected_label == label
    finally:
        torch.set_num_threads(threads)


SLOW_CHILD = """
import sys, time
from atpt_plugin.adapters import runner
append = runner.ResultLog.append
def slow_append(self, record):
    append(self, record)
    time.sleep(0.5)       # widen the gaps so the test's kill lands mid-run
runner.ResultLog.append = slow_append
from atpt_plugin.adapters.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_a_kill_loses_and_repeats_nothing(workspace, reference):
    out = workspace / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, *eval_args(workspace, "killed")],
        cwd=workspace,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    total = N_IMAGES * len(ADAPTERS.split(","))
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            path = out / "samples.jsonl"
            if path.exists() and path.read_bytes().count(b"\n") >= 3:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    written = (out / "samples.jsonl").read_bytes()
    assert 3 <= written.count(b"\n") < total  # killed mid-way
    with open(out / "samples.jsonl", "ab") as handle:  # and as if killed in the middle of a write
        handle.write(b'{"adapter": "atpt", "adv": 0, "cle')
    done = run_cli(workspace, eval_args(workspace, "killed"))
    assert "resuming" in done.stderr
    resumed = predictions(out)  # every sample exactly once
    assert resumed == predictions(reference[0])
    assert (out / "samples.jsonl").read_bytes().startswith(written[: written.rfind(b"\n") + 1])  # append-only
    assert accuracies(out) == accuracies(reference[0])


@pytest.mark.slow
def test_two_processes_with_gloo_equal_one(workspace, reference):
    out = workspace / "two"
    done = run_cli(workspace, eval_args(workspace, "two", "--nproc", "2"))
    assert "2 process(es)" in done.stderr
    assert (out / "samples.rank1.jsonl").is_file()
    found = records(out)
    assert all(r["rank"] == r["position"] % 2 for r in found)  # sharded without padding
    assert predictions(out) == predictions(reference[0])  # no duplicates, none missing, equal
    assert accuracies(out) == accuracies(reference[0])
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def free_port():
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_process(workspace, reference):
    """torchrun across two "machines" (two launchers on localhost, c10d rendezvous, gloo on
    the CPU) into one shared --out: the records and rows of the single-process run."""
    out = workspace / "nodes"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv_id",
        "atpt-two-nodes",
        "-m",
        "atpt_plugin.adapters.cli",
        *eval_args(workspace, "nodes"),
    ]
    nodes = [
        subprocess.Popen(launcher, cwd=workspace, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    assert sorted(p.name for p in out.glob("samples*.jsonl")) == ["samples.jsonl", "samples.rank1.jsonl"]
    assert predictions(out) == predictions(reference[0])
    assert accuracies(out) == accuracies(reference[0])
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_other_arguments_into_the_same_folder_are_refused(workspace, reference, capsys):
    args = eval_args(workspace, "ref")
    args[args.index("--eps") + 1] = "8"
    before = (reference[0] / "samples.jsonl").read_bytes()
    assert cli.main(args) == 2
    message = capsys.readouterr().err
    assert "holds a run with other settings" in message and "attack.eps" in message and "another --out" in message
    assert (reference[0] / "samples.jsonl").read_bytes() == before
    held = lock_folder(reference[0], 0)  # a run still writing to the folder
    try:
        assert cli.main(eval_args(workspace, "ref")) == 2
        assert "another `atpt eval` is writing to" in capsys.readouterr().err
    finally:
        held.close()
    assert (reference[0] / "samples.jsonl").read_bytes() == before


def test_list_shows_adapters_datasets_and_attacks(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    assert "atpt " in text and "split_zhou_OxfordPets.json" in text and "pgd" in text and "autoattack" in text


@pytest.mark.parametrize(
    "change, expected",
    [
        (("--adapters", "atpt,nope"), "no adapter named 'nope'.*installed adapters: .*atpt"),
        (
            ("--adapters", "atpt[vews=8]"),
            "adapter variant 'atpt\\[vews=8\\]': unknown adapter setting 'vews' \\(did you mean 'views'",
        ),
        (("--adapters", "atpt[views=8"), "unbalanced brackets"),
        (("--dataset", "petz"), "no dataset named 'petz' \\(did you mean 'pets'\\?\\); installed datasets: aircraft, "),
        (
            ("--attack", "pgdd"),
            "no attack named 'pgdd'.*installed attacks: apgd-eot, autoattack, cw, eot-pgd, fgsm, none, pgd, pgdl2, "
            "square",
        ),
        (("--eps", "0.0157"), "ambiguous: L-inf budgets on the command line are in 1/255 units"),
        (("--model", "ViT-B-99"), "no model named 'ViT-B-99'.*open_clip models: "),
    ],
)
def test_bad_input_lists_the_valid_choices(workspace, capsys, change, expected):
    import re

    args = eval_args(workspace, "never")
    args[args.index(change[0]) + 1] = change[1]
    assert cli.main(args) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (workspace / "never").exists()


def test_offline_pretrained_name_suggests_a_local_path(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = eval_args(workspace, "never")
    args[args.index("--model") + 1] = "RN50"
    args[args.index("--pretrained") + 1] = "openai"
    assert cli.main(args) == 2
    message = capsys.readouterr().err
    assert "could not be fetched" in message and "--pretrained /path/to/" in message and "offline" in message
    args[args.index("--pretrained") + 1] = "not-a-tag"
    assert cli.main(args) == 2
    assert "not a pretrained tag of RN50; its tags: openai" in capsys.readouterr().err
    args[args.index("--pretrained") + 1] = str(workspace / "missing.pt")
    assert cli.main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_adapter_variants_are_rows_of_their_own_and_resume(workspace, one_thread):
    """`--adapters "zeroshot,atpt[aggregator=mean]"`: the variant is its own row and its own
    records, equal to the same settings given with --set; a rerun recomputes nothing."""
    args = eval_args(workspace, "variants")
    args[args.index("--adapters") + 1] = "zeroshot,atpt[aggregator=mean,layer_weights=[0.5,1.0]]"
    assert cli.main(args) == 0
    out = workspace / "variants"
    first = records(out)
    names = {row["adapter"] for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert names == {"zeroshot", "atpt[aggregator=mean,layer_weights=[0.5,1.0]]"}
    assert cli.main(args) == 0
    assert records(out) == first, "a resumed run must not recompute or duplicate a sample"

    plain = eval_args(workspace, "variants-set", "--set", "aggregator=mean", "--set", "layer_weights=[0.5,1.0]")
    assert cli.main(plain) == 0
    variant = {r["position"]: (r["clean"], r["adv"]) for r in first if r["adapter"].startswith("atpt[")}
    with_set = {
        r["position"]: (r["clean"], r["adv"]) for r in records(workspace / "variants-set") if r["adapter"] == "atpt"
    }
    assert variant == with_set
