"""APGD with EOT (AutoAttack's randomized version) through the whole defence: gradients flow
through the adapter, the reported image is checked against the deployed adapter, and the
sanity checks pass on the demo model."""

import json

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.adaptive import run_adaptive
from atpt_plugin.adapters.attacks import AttackStats, make_attack
from conftest import CLASSNAMES

from atpt_plugin import load_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_apgd_eot_attacks_the_defence_through_its_gradients(loss, tiny_vit, tokenizer):
    tta = load_adapter("atpt", views=6, rho=0.34).wrap(tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = tta(x).argmax(1)  # correct clean
    spec = make_attack("apgd-eot", eps=2 / 255, steps=3, eot_iter=2, loss=loss, n_target_classes=2)
    stats = AttackStats()
    adversarial = run_adaptive(spec, tta, x, y, seed=4, stats=stats)
    assert (adversarial - x).abs().max() <= 2 / 255 + 1e-6 and not torch.equal(adversarial, x)
    assert 0 < stats.backward <= spec.cost()["backward"] * 4 and stats.forward <= spec.cost()["forward"] * 4
    assert stats.forward > stats.backward  # the deployed adapter saw each candidate
    torch.testing.assert_close(run_adaptive(spec, tta, x, y, seed=4), adversarial, atol=0, rtol=0)  # seeded
    with torch.no_grad():
        fooled = tta(adversarial).argmax(1) != y
    # a restart or target class runs only on images the deployed adapter still classifies correctly
    runs = 2 if loss == "dlr-targeted" else 1
    assert stats.backward <= (runs * len(x) - (runs - 1) * int(fooled.sum())) * (3 + 1) * 2


def test_apgd_eot_parameters_are_checked():
    assert make_attack("APGD_EOT").name == "apgd-eot" and make_attack("apgd-eot").is_adaptive
    with pytest.raises(ValueError, match="loss must be one of ce, dlr, dlr-targeted"):
        make_attack("apgd-eot", loss="margin")
    with pytest.raises(ValueError, match="gradient must be one of"):
        make_attack("apgd-eot", gradient="sign")
    with pytest.raises(ValueError, match="takes no alpha"):
        make_attack("apgd-eot", alpha=1 / 255)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_eot_on_the_demo_passes_its_sanity_checks(loss, tmp_path):
    args = ["eval", "--model", "fmnist-vit-tiny", "--adapters", "atpt", "--set", "views=8", "--attack", "apgd-eot"]
    args += ["--attack-steps", "4", "--attack-opt", "eot_iter=2", "--attack-opt", f"loss={loss}", "--eps", "4"]
    args += ["--n-examples", "4", "--sanity-checks", "4", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"][0]
    assert row["attack_kind"] == "adaptive" and row["attack_zero_gradients"] == 0 and row["warnings"] == []
    assert {c["check"] for c in row["sanity_checks"]} == {"fewer_steps", "fewer_eot", "large_eps", "transfer"}
    assert all(c["passed"] for c in row["sanity_checks"])
    assert row["adv_acc"] < row["clean_acc"]  # the attack works through the defence
