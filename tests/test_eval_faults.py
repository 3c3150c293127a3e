"""Fault injection on `atpt eval`: kills at random points, corrupt cache entries and images,
damaged results lines, write errors. Each fault gives one clear message (or one warning
line), never a traceback, and loses nothing finished: after the rerun, summary.json and
the per-sample records equal those of an uninterrupted run (wall-clock fields aside).

Runs use the embedded demo model by its name (`--model fmnist-vit-tiny`) on 12 images,
3 attack steps, batches of 4: three attack batches, 24 (sample, adapter) records.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.models import create_model
from PIL import Image

pytestmark = pytest.mark.slow  # kills and reruns `atpt eval` subprocesses

N = 12
ADAPTERS = ("zeroshot", "rtpt")
RUN = [
    "eval",
    "--model",
    "fmnist-vit-tiny",
    "--adapters",
    ",".join(ADAPTERS),
    "--set",
    "views=8",
    "--n-examples",
    str(N),
    "--attack-steps",
    "3",
    "--attack-batch-size",
    "4",
    "--no-progress",
]
WALL_CLOCK = {"seconds", "checks_seconds", "seconds_per_image", "attack_seconds_per_image", "model_info"}
WALL_CLOCK |= {"attack_seconds", "checksum"}  # a record's measured attack share, and its checksum over its seconds
WALL_CLOCK |= {"attack_seconds_measured_earlier"}  # how many were measured before a kill: the resume's history


def run_args(out, cache, *extra):
    return [*RUN, "--out", str(out), "--cache-dir", str(cache), *extra]


def run_here(args, capsys):
    """`atpt eval` in this process (one thread, as the subprocesses): (exit code, stderr)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def sample_records(out):
    """{(adapter, position): record without wall-clock fields}; every pair exactly once."""
    found = {}
    for path in sorted(out.glob("samples*.jsonl")):
        data = path.read_text()
        assert data.endswith("\n"), f"{path} ends in a partial line"
        for line in data.splitlines():
            record = json.loads(line)
            key = (record["adapter"], record["position"])
            assert key not in found, f"{key} recorded twice"
            found[key] = {k: v for k, v in record.items() if k not in WALL_CLOCK}
    return found


def summary(out):
    """summary.json without wall-clock fields."""
    content = json.loads((out / "summary.json").read_text())
    content.pop("finished")
    content["rows"] = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in content["rows"]]
    return content


def assert_equal_to(out, reference):
    assert sample_records(out) == sample_records(reference)
    assert summary(out) == summary(reference)


def assert_one_clear_error(err, *needles):
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("atpt: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (output folder, its cache folder)."""
    root = tmp_path_factory.mktemp("faults")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(run_args(root / "ref", root / "cache-ref")) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(sample_records(root / "ref")) == N * len(ADAPTERS)
    return root / "ref", root / "cache-ref"


# ---- (a) kills at random points, resumed each time ------------------------------------------
KILLER = """
import os, signal, sys
point, after = sys.argv[1], int(sys.argv[2])
calls = 0

def hit():
    global calls
    calls += 1
    if calls == after:
        os.kill(os.getpid(), signal.SIGKILL)

from atpt_plugin.adapters import runner
if point == "attack":      # after the after-th attack batch is computed, before it is cached
    attack = runner.run_attack
    def run_attack(*args, **kwargs):
        result = attack(*args, **kwargs)
        hit()
        return result
    runner.run_attack = run_attack
elif point == "adapt":     # at the after-th image-tower pass inside an adapter's call (mid-batch)
    hook = runner.PassCounter._hook
    def counting_hook(self, module, inputs, output):
        hook(self, module, inputs, output)
        hit()
    runner.PassCounter._hook = counting_hook
else:                      # the after-th write to a file named *point* stops halfway
    names, real_open, real_write = {}, os.open, os.write
    def tracked_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        names[fd] = os.path.basename(os.fspath(path))
        return fd
    def half_write(fd, data):
        if point in names.get(fd, ""):
            if calls + 1 == after:
                real_write(fd, bytes(data)[: len(data) // 2])
            hit()
        return real_write(fd, data)
    os.open, os.write = tracked_open, half_write
from atpt_plugin.adapters.cli import main
sys.exit(main(sys.argv[3:]))
"""


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_kills_at_random_points_resume_to_the_uninterrupted_result(tmp_path, reference):
    rng = random.Random(17)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_args(out, cache)
    (tmp_path / "killer.py").write_text(KILLER)
    plan = [
        ("attack", rng.randint(1, 2)),  # mid attack phase
        ("batch-", 1),  # mid-write of a cache entry
        ("attack", 1),
        ("adapt", rng.randint(1, 6)),  # mid-batch of adaptation
        ("samples.jsonl", rng.randint(2, 5)),  # mid-write of a results line
        ("adapt", rng.randint(1, 6)),
    ]
    for point, after in plan:
        done = subprocess.run(
            [sys.executable, str(tmp_path / "killer.py"), point, str(after), *args],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == -signal.SIGKILL, (point, after, done.stderr[-2000:])
        if point == "samples.jsonl":
            assert not (out / "samples.jsonl").read_bytes().endswith(b"\n")  # a half-written line is left
        if point == "batch-":
            assert any(cache.glob("*/.batch-*.tmp"))  # a half-written temporary
    delay = rng.uniform(2.0, 6.0)  # and one kill at a random moment, from outside
    child = subprocess.Popen(
        [sys.executable, "-m", "atpt_plugin.adapters.cli", *args],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    done = subprocess.run(
        [sys.executable, "-m", "atpt_plugin.adapters.cli", *args],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "Traceback" not in done.stderr
    assert_equal_to(out, reference[0])


# ---- (b) a corrupt cache entry ----------------------------------------------------------------
def test_corrupt_cache_entries_are_reported_recomputed_and_replaced(tmp_path, reference, capsys):
    ref, cache = reference
    folder = next(cache.iterdir())
    entries = sorted(folder.glob("batch-*.pt"))
    assert len(entries) == 3
    truncated, flipped = entries[0], entries[2]
    truncated.write_bytes(truncated.read_bytes()[:3000])  # a killed copy
    data = bytearray(flipped.read_bytes())
    data[-2000] ^= 0xFF  # one bad byte, still a readable file
    flipped.write_bytes(bytes(data))
    (folder / "key.json").write_text('{"model": ')  # the folder's key file, cut short
    code, err = run_here(run_args(tmp_path / "out", cache), capsys)
    assert code == 0 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("atpt: warning:")]
    assert len(warnings) == 3, err  # one line per damaged file
    assert any(str(truncated) in w and "unreadable" in w for w in warnings)
    assert any(str(flipped) in w and "checksum" in w for w in warnings)
    assert any(str(folder / "key.json") in w for w in warnings)
    assert_equal_to(tmp_path / "out", ref)
    code, err = run_here(run_args(tmp_path / "again", cache), capsys)  # replaced: read back cleanly
    assert code == 0 and "warning" not in err
    assert_equal_to(tmp_path / "again", ref)


# ---- (b) a corrupt image ------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder of 12 small images in 3 classes; `bad` are dataset indices made unreadable."""
    from atpt_plugin.adapters.datasets import load_dataset, select

    root = tmp_path / "garments"
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        folder = root / ["shirt", "sneaker", "bag"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=90)
    dataset = load_dataset("imagefolder", root, image_size=32)
    order = select(len(dataset), None, 0)
    bad = [order[5], order[9]]  # positions 5 and 9: the second and third batch of 4
    first = root / dataset.samples[bad[0]][0]
    first.write_bytes(first.read_bytes()[:300])  # a truncated JPEG
    (root / dataset.samples[bad[1]][0]).write_bytes(b"not an image at all")
    return root, dataset, bad


def test_bad_image_error_names_the_file_and_the_sample(image_folder):
    from atpt_plugin.adapters.datasets import BadImageError

    root, dataset, bad = image_folder
    with pytest.raises(BadImageError) as caught:
        dataset[bad[0]]
    message = str(caught.value)
    assert str(root / dataset.samples[bad[0]][0]) in message and f"dataset index {bad[0]}" in message
    good = next(i for i in range(len(dataset)) if i not in bad)
    assert dataset[good][0].shape == (3, 32, 32)


def test_bad_images_stop_the_run_or_are_skipped_and_listed(tmp_path, image_folder, capsys):
    root, dataset, bad = image_folder
    args = [
        "eval",
        "--model",
        "fmnist-vit-tiny",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(root),
        "--adapters",
        "zeroshot",
        "--attack",
        "none",
        "--attack-batch-size",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, err = run_here(args, capsys)
    assert code == 2
    assert_one_clear_error(
        err,
        str(root / dataset.samples[bad[0]][0]),
        "sample 5 of the run",
        "--on-bad-image skip",
        "Removing the file instead changes the dataset",  # removing it would make this --out refuse the run
    )
    before = (tmp_path / "out" / "samples.jsonl").read_bytes()
    assert before.count(b"\n") == 4  # the first batch is finished and kept
    code, err = run_here([*args, "--on-bad-image", "skip"], capsys)
    assert code == 0 and "Traceback" not in err
    out = tmp_path / "out"
    assert (out / "samples.jsonl").read_bytes().startswith(before)  # nothing finished is recomputed
    records = sample_records(out)
    assert sorted(p for _, p in records) == [p for p in range(12) if p not in (5, 9)]
    content = json.loads((out / "summary.json").read_text())
    assert [(s["position"], s["index"], s["path"]) for s in content["skipped"]] == [
        (5, bad[0], str(root / dataset.samples[bad[0]][0])),
        (9, bad[1], str(root / dataset.samples[bad[1]][0])),
    ]
    row = content["rows"][0]
    assert row["n"] == 10  # neither right nor wrong
    assert row["clean_correct"] == sum(r["clean"] == r["label"] for r in records.values())
    assert "2 images could not be read" in (out / "results.md").read_text()


# ---- (b) a damaged middle line of samples.jsonl -------------------------------------------------
def test_damaged_middle_lines_are_reported_and_repaired_on_request(tmp_path, reference, capsys):
    ref, cache = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    lines = (out / "samples.jsonl").read_bytes().splitlines(keepends=True)
    lines[4] = b'{"adapter": "rtpt", "clean": 3, \x00\x00\x00 garbage}\n'  # bytes damaged on disk
    lines[9] = lines[9][: len(lines[9]) // 2] + b"\n"  # a line cut short
    damaged = b"".join(lines)
    (out / "samples.jsonl").write_bytes(damaged)
    code, err = run_here(run_args(out, cache), capsys)
    assert code == 2
    assert_one_clear_error(
        err,
        "samples.jsonl:5:",
        "samples.jsonl:10:",
        "--repair-results",
        f"the other {N * len(ADAPTERS) - 2} records are kept",
    )
    assert (out / "samples.jsonl").read_bytes() == damaged  # untouched without the flag
    code, err = run_here(run_args(out, cache, "--repair-results"), capsys)
    assert code == 0 and "Traceback" not in err
    assert "dropped 2 damaged record(s)" in err and "line(s) 5, 10" in err
    kept = [line for i, line in enumerate(lines) if i not in (4, 9)]
    assert (out / "samples.jsonl").read_bytes().startswith(b"".join(kept))  # the rest kept as it was
    assert_equal_to(out, ref)


# ---- (b) write errors: a full disk, a failing fsync ----------------------------------------------
class FaultyDisk:
    """Patched os.open / os.write / os.fsync: the `after`-th write to a file whose name holds
    `name` writes half its bytes (a short write on a nearly full disk) and the next one fails
    with ENOSPC; or `os.fsync` of that file fails with EIO."""

    def __init__(self, monkeypatch, name, after=1, fault="ENOSPC"):
        self.names, self.writes = {}, 0
        real_open, real_write, real_fsync = os.open, os.write, os.fsync

        def tracked_open(path, *args, **kwargs):
            fd = real_open(path, *args, **kwargs)
            self.names[fd] = os.path.basename(os.fspath(path))
            return fd

        def write(fd, data):
            if fault == "ENOSPC" and name in self.names.get(fd, ""):
                self.writes += 1
                if self.writes == after:
                    return real_write(fd, bytes(data)[: max(1, len(data) // 2)])
                if self.writes > after:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        def fsync(fd):
            if fault == "EIO" and name in self.names.get(fd, ""):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fsync(fd)

        monkeypatch.setattr(os, "open", tracked_open)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    "name, after, fault, message",
    [
        ("batch-", 2, "ENOSPC", "No space left on device"),  # a cache entry, in the attack phase
        ("samples.jsonl", 4, "ENOSPC", "No space left on device"),  # a results line, mid-run
        ("summary.json", 1, "ENOSPC", "No space left on device"),  # the summary, at the end
        ("results.png", 1, "EIO", "Input/output error"),  # any write error, here a failing fsync
    ],
)
def test_write_errors_stop_the_run_clearly_and_the_rerun_resumes(
    tmp_path, reference, capsys, monkeypatch, name, after, fault, message
):
    ref, ref_cache = reference
    cache = tmp_path / "cache"
    if name != "batch-":
        shutil.copytree(ref_cache, cache)  # spare the attack where it is not the point
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        FaultyDisk(patch, name, after, fault)
        code, err = run_here(run_args(out, cache), capsys)
    assert code == 1
    assert_one_clear_error(err, "could not write", name, message, "run the same command again")
    if name == "samples.jsonl":
        written = (out / "samples.jsonl").read_bytes()
        assert written.count(b"\n") == after - 1 and written.endswith(b"\n")  # whole lines only
    assert not list(out.glob(".*.tmp")) and not list(cache.glob("*/.*.tmp"))  # no temporary left behind
    code, err = run_here(run_args(out, cache), capsys)
    assert code == 0 and "resuming" in err
    assert_equal_to(out, ref)


# ---- the embedded model by name ---------------------------------------------------------------------
def test_the_embedded_model_is_a_named_model_with_its_weights_as_default():
    from atpt_plugin.demo_model import checkpoint_path

    _, _, name, pretrained = create_model("fmnist-vit-tiny", None)
    assert name == "fmnist-vit-tiny" and pretrained == str(checkpoint_path().resolve())
    assert create_model("demo", None)[2:] == (name, pretrained)
    assert create_model("fmnist-vit-tiny", "none")[3] == "none"
