"""`python -m bench.gpu_check --quick` runs on a CPU and writes every section, so the GPU command cannot rot."""

import itertools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import gpu_check  # noqa: E402


@pytest.mark.slow
def test_quick_check_writes_every_section(tmp_path, one_thread):
    gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())
    assert (tmp_path / "gpu_check_cpu_quick.md").read_text().startswith("# GPU check on ")

    devices = results["cuda_vs_cpu"]
    assert devices["run"] is False and "no CUDA device" in devices["reason"]
    batches = results["image_batch"]
    assert batches["same_predictions"] is True
    for name in gpu_check.ADAPTERS:
        assert set(batches["adapters"][name]) == {"8", "32"}
        assert all(check["same_predictions"] is True for check in batches["adapters"][name].values())

    timed = {(r["adapter"], r["precision"], r["image_batch"]) for r in results["throughput"]}
    assert timed == set(itertools.product(gpu_check.ADAPTERS, gpu_check.PRECISIONS, gpu_check.IMAGE_BATCHES))
    assert [r["adapter"] for r in results["naive"]] == list(gpu_check.ADAPTERS)
    assert [r["attack_batch"] for r in results["attack"]] == list(gpu_check.ATTACK_BATCHES)
    for row in results["throughput"] + results["naive"] + results["attack"]:
        assert row["images_per_s"] > 0 and row["peak_mb"] > 0


def test_the_full_check_refuses_a_cpu(capsys):
    with pytest.raises(SystemExit) as exit:
        gpu_check.main(["--device", "cpu"])
    assert exit.value.code == 2
    assert "run it on a GPU, or pass --quick" in capsys.readouterr().err
