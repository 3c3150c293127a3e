"""Adaptive attacks on the whole wrapped adapter: input gradients, EOT-PGD on the BPDA and exact
paths, Square, the sanity checks (firing on a broken attack), resume, and `atpt eval --attack eot-pgd`."""

import json

import pytest
import torch
from atpt_plugin.adapters import cli
from atpt_plugin.adapters.adaptive import SanityChecks, check_attacks, judge, run_adaptive
from atpt_plugin.adapters.attacks import AttackStats, ZeroShotClassifier, attack_loss, attack_view, make_attack
from atpt_plugin.adapters.report import csv_table, markdown_table
from atpt_plugin.adapters.resultlog import ResultLog
from atpt_plugin.adapters.runner import Evaluation
from atpt_plugin.adapters.sources import TensorSource
from conftest import CLASSNAMES
from test_eval_cli import eval_args, workspace  # noqa: F401  (the tiny on-disk dataset of the CLI tests)

from atpt_plugin import adapter as adapter_module
from atpt_plugin import load_adapter

SMALL = dict(views=6, rho=0.34)  # 6 views, 2 confident


pytestmark = pytest.mark.usefixtures("one_thread")


def wrap(name, model, tokenizer, **overrides):
    return load_adapter(name, **{**SMALL, **overrides}).wrap(model, classnames=CLASSNAMES, tokenizer=tokenizer)


@pytest.mark.parametrize("path", ["bpda", "exact"])
@pytest.mark.parametrize("name", ["atpt", "rtpt"])
def test_input_gradients_flow_through_the_full_pipeline(name, path, tiny_vit, tokenizer, images):
    tta = wrap(name, tiny_vit, tokenizer)
    view = attack_view(tta, gradient=path)
    x = images[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(attack_loss(view(x), torch.tensor([0, 1])), [x])
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient of its own


def test_the_attacked_view_shares_the_model_and_draws_fresh_views(tiny_vit, tokenizer, images):
    tta = wrap("atpt", tiny_vit, tokenizer)
    view = attack_view(tta, gradient="bpda")
    assert view.config.seed is None and view.config.input_gradient == "bpda"
    assert tta.config.seed == 0 and tta.config.input_gradient == "fixed_prompt"  # the deployed one is untouched
    assert view.model is tta.model and view.prompt is tta.prompt and view.augmenter is tta.augmenter
    with torch.no_grad():
        assert not torch.equal(view(images[:1]), view(images[:1]))  # EOT: new views each call
        assert torch.equal(tta(images[:1]), tta(images[:1]))  # deployed: a function of the image
    plain = torch.nn.Linear(2, 2)
    assert attack_view(plain, gradient="bpda") is plain


@pytest.mark.parametrize("path", ["bpda", "exact"])
def test_eot_pgd_runs_on_the_bpda_and_exact_paths(path, tiny_vit, tokenizer, images):
    tta = wrap("atpt", tiny_vit, tokenizer)
    x = images[:2]
    with torch.no_grad():
        y = tta(x).argmax(1)  # correct clean: the attack has work to do
    spec = make_attack("eot-pgd", eps=1 / 255, steps=2, eot_iter=2, gradient=path)
    stats = AttackStats()
    rng = torch.get_rng_state()
    adversarial = run_adaptive(spec, tta, x, y, seed=3, stats=stats)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert (adversarial - x).abs().max() <= 1 / 255 + 1e-6 and 0 <= adversarial.min() and adversarial.max() <= 1
    assert not torch.equal(adversarial, x)
    # per image: one check of the start, then per step eot_iter gradient passes and one check
    steps_taken = stats.backward // 2
    assert 0 < stats.backward <= 2 * 2 * 2 and stats.forward == stats.backward + steps_taken + 2
    assert stats.seconds > 0
    torch.testing.assert_close(run_adaptive(spec, tta, x, y, seed=3), adversarial)  # seeded: reproducible


def test_eot_pgd_raises_the_loss_of_the_deployed_adapter(tiny_vit, tokenizer, images):
    tta = load_adapter("zeroshot").wrap(tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer)
    y = torch.tensor([0, 1, 2])
    adversarial = run_adaptive(make_attack("eot-pgd", eps=16 / 255, steps=5, eot_iter=1), tta, images, y, seed=0)
    with torch.no_grad():
        assert attack_loss(tta(adversarial), y) > attack_loss(tta(images), y)


class NoInputGradient(adapter_module.TestTimeAdapter):
    """An adapter whose output has a graph but no gradient path to the image (masked gradients)."""

    def aggregate(self, views, features, text):
        return super().aggregate(views, features.detach(), text) + 0 * features.sum()


def test_an_output_without_input_gradient_is_reported_not_fatal(tiny_vit, tokenizer, images):
    mta = NoInputGradient(tiny_vit, CLASSNAMES, tokenizer, load_adapter("mta", **SMALL).config, "mta")
    spec = make_attack("eot-pgd", eps=8 / 255, steps=2, eot_iter=1, random_start=False)
    stats = AttackStats()
    with torch.no_grad():
        y = mta(images[:2]).argmax(1)  # correct clean: attacked until the last step
    assert torch.equal(run_adaptive(spec, mta, images[:1], y[:1], seed=0, stats=stats), images[:1])
    assert stats.zero_gradients == stats.backward == 2
    evaluation = Evaluation({"mta": mta}, TensorSource(images[:2], y), spec, None, None, sanity=SanityChecks(n=0))
    row = evaluation.run()[0].as_dict()
    assert row["attack_zero_gradients"] == 4 and row["sanity_checks"] == []
    assert len(row["warnings"]) == 1 and "4 of 4 input gradients of eot-pgd were exactly zero" in row["warnings"][0]


def test_square_queries_the_deployed_pipeline_without_gradients(tiny_vit, tokenizer, images):
    tta = wrap("rtpt", tiny_vit, tokenizer)
    tiny_vit.train()  # flags must come back as they were
    with torch.no_grad():
        y = tta(images[:1]).argmax(1)  # correctly classified: Square attacks it
    spec = make_attack("square", eps=16 / 255, n_queries=6)
    stats = AttackStats()
    adversarial = run_adaptive(spec, tta, images[:1], y, seed=0, stats=stats)
    assert (adversarial - images[:1]).abs().max() <= 16 / 255 + 1e-6
    assert 1 <= stats.forward <= 6 + 2 and stats.backward == 0
    assert all(module.training for module in tiny_vit.modules())


def test_adaptive_attacks_by_name_with_their_parameters_and_cost():
    spec = make_attack("EOT_PGD")
    assert spec.name == "eot-pgd" and spec.kind == "adaptive" and spec.is_adaptive
    assert spec.param_dict == {
        "alpha": 1 / 255,
        "eot_iter": 4,
        "gradient": "bpda",
        "loss": "ce",
        "random_start": True,
        "steps": 20,
    }
    # at most: 20 steps x 4 draws with a backward pass, and a check of the start and of each step
    assert spec.cost() == {"forward": 80 + 21, "backward": 80, "unit": "adaptation (at most)", "shared": False}
    assert spec.describe().startswith("eot-pgd (adaptive, Linf, eps=4/255")
    assert make_attack("pgd").kind == "transfer" and make_attack("pgd").cost()["shared"]
    assert make_attack("pgd", steps=7).cost() == {
        "forward": 7,
        "backward": 7,
        "unit": "zero-shot center view",
        "shared": True,
    }
    square = make_attack("square", n_queries=50)
    assert square.kind == "adaptive" and square.cost()["forward"] == 50 and square.cost()["backward"] == 0
    assert make_attack("square", norm="L2").norm == "L2"
    with pytest.raises(ValueError, match="gradient must be one of fixed_prompt, bpda, exact"):
        make_attack("eot-pgd", gradient="sign")
    with pytest.raises(ValueError, match="eot_iter must be a positive integer"):
        make_attack("eot-pgd", eot_iter=0)
    with pytest.raises(ValueError, match="attack 'square' has no parameter 'steps'|takes no steps"):
        make_attack("square", steps=3)


def test_check_attacks_are_cheaper_variants_a_large_eps_and_the_transfer_pgd():
    spec = make_attack("eot-pgd", eps=4 / 255, steps=20, eot_iter=4)
    variants = check_attacks(spec, SanityChecks(n=4))
    assert set(variants) == {"fewer_steps", "fewer_eot", "large_eps", "transfer"}
    assert variants["fewer_steps"].param_dict["steps"] == 5 and variants["fewer_eot"].param_dict["eot_iter"] == 1
    assert variants["large_eps"].eps == pytest.approx(64 / 255)
    assert variants["large_eps"].param_dict["alpha"] == pytest.approx(16 / 255)  # alpha scales with eps
    assert variants["transfer"].name == "pgd" and variants["transfer"].param_dict["steps"] == 100
    single = check_attacks(make_attack("eot-pgd", steps=1, eot_iter=1), SanityChecks())
    assert set(single) == {"large_eps", "transfer"}  # no cheaper variant of one step, one sample
    assert set(check_attacks(make_attack("square"), SanityChecks())) == {"fewer_queries", "large_eps", "transfer"}
    assert check_attacks(make_attack("pgd"), SanityChecks()) == {} == check_attacks(spec, SanityChecks(n=0))


def test_judge_warns_on_each_failed_check():
    spec = make_attack("eot-pgd", steps=8, eot_iter=4)
    sanity = SanityChecks(n=10)
    variants = check_attacks(spec, sanity)
    good = dict(fewer_steps=5, fewer_eot=4, large_eps=0, transfer=6)
    checks, warnings = judge(spec, variants, sanity, 10, 4, good, adapter="atpt")
    assert [c["passed"] for c in checks] == [True] * 4 and warnings == []
    bad = dict(fewer_steps=3, fewer_eot=2, large_eps=2, transfer=1)  # everything the other way round
    checks, warnings = judge(spec, variants, sanity, 10, 4, bad, adapter="atpt")
    assert [c["check"] for c in checks if not c["passed"]] == ["fewer_steps", "fewer_eot", "large_eps", "transfer"]
    assert len(warnings) == 4 and all(w.startswith("atpt: sanity check") for w in warnings)
    assert "4/10 correct under eot-pgd vs 1/10 under the transfer attack" in warnings[-1]
    assert judge(spec, variants, sanity, 10, 4, dict(good, large_eps=1))[1] == []  # 10% is "near zero"
    assert judge(spec, variants, sanity, 0, 0, {}) == ([], [])


def broken_evaluation(tiny_vit, tokenizer, images, log=None):
    """EOT-PGD with a zero step size and no random start: the "attack" changes nothing."""
    tta = wrap("atpt", tiny_vit, tokenizer)
    x = torch.cat([images, images.flip(-1)])
    with torch.no_grad():
        y = tta(x).argmax(1)  # clean accuracy 100%
    spec = make_attack("eot-pgd", eps=16 / 255, steps=2, eot_iter=1, random_start=False).replace(alpha=0.0)
    return Evaluation(
        {"atpt": tta},
        TensorSource(x, y),
        spec,
        ZeroShotClassifier.from_adapter(tta),
        None,
        sanity=SanityChecks(n=4, transfer_steps=10),
        log=log,
    ), len(x)


def test_sanity_checks_fire_on_a_broken_attack(tiny_vit, tokenizer, images):
    evaluation, n = broken_evaluation(tiny_vit, tokenizer, images)
    row = evaluation.run()[0].as_dict()
    assert row["clean_acc"] == row["adv_acc"] == 1.0  # the attack did nothing
    assert row["attack_kind"] == "adaptive" and row["attack_forward_per_image"] == 2 + 3  # 2 steps, 3 checks
    failed = {c["check"] for c in row["sanity_checks"] if not c["passed"]}
    assert {"large_eps", "transfer"} <= failed  # not near zero, weaker than transfer
    assert {"fewer_steps", "large_eps", "transfer"} == {c["check"] for c in row["sanity_checks"]}
    assert any("'transfer' failed" in w for w in row["warnings"]) and any("'large_eps'" in w for w in row["warnings"])
    table = markdown_table([row])
    assert "eot-pgd (adaptive)" in table and "**FAIL**" in table and "**Warning**: atpt: sanity check" in table
    assert "sanity check 'transfer' failed" in csv_table([row])
    records = evaluation.merged
    assert len(records) == n and sum("checks" in r for r in records) == 4  # checks on the first 4 only
    assert all(r["attack"]["forward"] == 5 and r["attack"]["image_passes"] > 0 for r in records)


@pytest.mark.slow
def test_adaptive_results_and_checks_resume_from_the_results_file(tiny_vit, tokenizer, images, tmp_path, monkeypatch):
    first, _ = broken_evaluation(tiny_vit, tokenizer, images, ResultLog(tmp_path))
    rows = [row.as_dict() for row in first.run()]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished sample was attacked again")

    monkeypatch.setattr("atpt_plugin.adapters.adaptive_loop.run_adaptive_each", must_not_run)
    monkeypatch.setattr("atpt_plugin.adapters.runner.run_attack", must_not_run)
    monkeypatch.setattr("atpt_plugin.adapters.adaptive_loop.run_attack", must_not_run)
    again, _ = broken_evaluation(tiny_vit, tokenizer, images, ResultLog(tmp_path))
    resumed = [row.as_dict() for row in again.run()]
    assert [row["attack_seconds_measured_earlier"] for row in rows] == [0] * len(rows)
    assert [row.pop("attack_seconds_measured_earlier") for row in resumed] == [r["n"] for r in resumed]  # all earlier
    assert resumed == [{k: v for k, v in row.items() if k != "attack_seconds_measured_earlier"} for row in rows]


@pytest.mark.slow
def test_cli_eot_pgd_end_to_end(workspace, capsys):  # noqa: F811
    args = eval_args(workspace, "adaptive")
    for flag, value in (("--attack", "eot-pgd"), ("--attack-steps", "2"), ("--n-examples", "3"), ("--eps", "8")):
        args[args.index(flag) + 1] = value
    args += ["--attack-opt", "eot_iter=2", "--attack-opt", "gradient=exact", "--sanity-checks", "2"]
    assert cli.main(args) == 0
    out = workspace / "adaptive"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"]["kind"] == "adaptive" and summary["attack"]["params"]["gradient"] == "exact"
    assert summary["attack"]["cost"] == {
        "forward": 4 + 3,
        "backward": 4,
        "unit": "adaptation (at most)",
        "shared": False,
    }
    assert summary["settings"]["sanity_checks"]["n"] == 2 and isinstance(summary["warnings"], list)
    for row in summary["rows"]:
        assert row["n"] == 3 and row["attack_kind"] == "adaptive" and 1 <= row["attack_forward_per_image"] <= 7
        assert row["attack_image_passes_per_image"] >= 1 and row["attack_seconds_per_image"] > 0
        assert {c["check"] for c in row["sanity_checks"]} == {"fewer_eot", "fewer_steps", "large_eps", "transfer"}
        assert all(c["n"] == 2 for c in row["sanity_checks"])
    results = (out / "results.md").read_text()
    assert "eot-pgd (adaptive)" in results and "Sanity checks of the adaptive attack" in results
    assert "eot-pgd (adaptive)" in capsys.readouterr().out
    entry = json.loads((out / "model_info/pets/Linf/tiny-vit-eval-none_atpt.json").read_text())
    assert "eot_pgd_acc" in entry and "adaptive attack on the whole adaptive pipeline" in entry["footnote"]
    assert not (workspace / "cache-adaptive").exists()  # adaptive attacks are not cached
    assert cli.main(["list", "attacks"]) == 0
    listed = capsys.readouterr().out
    assert "eot-pgd" in listed and "square" in listed and "adaptive" in listed
