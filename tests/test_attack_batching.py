"""EOT-PGD keeps the first iterate that fools the deployed adapter (never weaker for more
steps), and a batch of images is attacked exactly as each image alone."""

import pytest
import torch
from atpt_plugin.adapters.adaptive import run_adaptive_each
from atpt_plugin.adapters.attacks import AttackStats, attack_view, eot_pgd, make_attack
from conftest import CLASSNAMES
from torch import nn

from atpt_plugin import load_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 2 / 255


@pytest.fixture
def setting(tiny_vit, tokenizer):
    """atpt on the tiny model, 8 images it classifies correctly (its own predictions as labels)."""
    tta = load_adapter("atpt", views=6, rho=0.34, image_batch=4).wrap(
        tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer
    )
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = tta(x).argmax(1)
    return tta, x, y


class Recorder(nn.Module):
    """The deployed adapter, remembering every iterate it was asked about and whether it was fooled."""

    def __init__(self, adapter, label):
        super().__init__()
        self.adapter, self.label, self.seen = adapter, label, []

    def forward(self, images):
        logits = self.adapter(images)
        self.seen += [(image.clone(), bool(p != self.label)) for image, p in zip(images, logits.argmax(-1))]
        return logits


def attack(tta, x, y, steps, seeds, deployed="same"):
    deployed = tta if deployed == "same" else deployed
    return eot_pgd(attack_view(tta, "bpda"), x, y, EPS, EPS / 4, steps, 1, True, "ce", seeds, None, deployed)


def test_each_sample_stops_at_its_first_iterate_that_fools_the_deployed_adapter(setting):
    tta, x, y = setting
    stopped_early = 0
    for i in range(len(x)):
        recorder = Recorder(tta, int(y[i]))
        result = attack(tta, x[i : i + 1], y[i : i + 1], 5, [i], recorder)[0]
        fooled = [seen for _, seen in recorder.seen]
        if any(fooled):
            first = fooled.index(True)
            assert first == len(fooled) - 1  # nothing attacked after the first fooling iterate
            torch.testing.assert_close(result, recorder.seen[first][0], atol=0, rtol=0)
            stopped_early += first < 5
        else:
            assert len(fooled) == 6 and torch.equal(result, recorder.seen[-1][0])  # start + 5 steps, the last kept
        with torch.no_grad():
            assert bool(tta(result[None]).argmax(1) != y[i]) == any(fooled)
    assert stopped_early  # the setting has samples that fall before the last step


def test_more_steps_never_report_robust_a_sample_that_fewer_steps_fooled(setting):
    tta, x, y = setting
    seeds = list(range(len(x)))
    with torch.no_grad():
        fooled = [(tta(attack(tta, x, y, steps, seeds)).argmax(1) != y) for steps in range(6)]
        last_iterate = tta(attack(tta, x, y, 5, seeds, deployed=None)).argmax(1) != y
    for fewer, more in zip(fooled, fooled[1:]):
        assert not (fewer & ~more).any()
    assert (fooled[-1] >= last_iterate).all()  # keeping the first fooling iterate is never weaker


@pytest.mark.parametrize("gradient", ["fixed_prompt", "bpda", "exact"])
def test_a_batch_is_attacked_exactly_as_each_image_alone(setting, gradient):
    tta, x, y = setting
    spec = make_attack("eot-pgd", eps=EPS, steps=3, eot_iter=2, gradient=gradient)
    seeds = [11 * i + 5 for i in range(len(x))]
    together_stats = [AttackStats() for _ in x]
    together = run_adaptive_each(spec, tta, x, y, seeds, together_stats)
    for i in range(len(x)):
        alone_stats = AttackStats()
        alone = run_adaptive_each(spec, tta, x[i : i + 1], y[i : i + 1], seeds[i : i + 1], [alone_stats])
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=0)
        assert (together_stats[i].forward, together_stats[i].backward) == (alone_stats.forward, alone_stats.backward)
    with torch.no_grad():
        assert torch.equal(
            tta(together).argmax(1), torch.cat([tta(together[i : i + 1]) for i in range(len(x))]).argmax(1)
        )


def test_a_batch_is_attacked_through_an_input_defence_reproducibly_within_budget(tiny_vit, tokenizer):
    """An input defence draws its own randomness (TTC's random start) before the views: each
    image's stream serves both stages, so a batched attack runs through it (it used to stop
    on a second draw per image). A batch does not equal each image alone bit for bit here:
    TTC's sign steps turn fp32 rounding of a batched image-tower pass into whole-step
    differences (docs/worst_case.md), so the test asks for reproducibility and the budget."""
    tta = load_adapter("atpt", views=6, rho=0.34, image_batch=4, input_defence="ttc").wrap(
        tiny_vit, classnames=CLASSNAMES, tokenizer=tokenizer
    )
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = tta(x).argmax(1)
    spec = make_attack("eot-pgd", eps=EPS, steps=2, eot_iter=1, gradient="bpda")
    seeds = [7 * i + 3 for i in range(len(x))]
    stats = [AttackStats() for _ in x]
    first = run_adaptive_each(spec, tta, x, y, seeds, stats)
    again = run_adaptive_each(spec, tta, x, y, seeds, [AttackStats() for _ in x])
    assert sum(item.backward for item in stats) > 0  # gradient steps ran through the defence
    assert torch.equal(first, again)
    assert (first - x).abs().max() <= EPS + 1e-6 and first.min() >= 0 and first.max() <= 1


def test_the_evaluation_loop_gives_the_same_records_for_any_attack_batch_size(setting):
    from atpt_plugin.adapters.adaptive import SanityChecks
    from atpt_plugin.adapters.runner import Evaluation
    from atpt_plugin.adapters.sources import TensorSource

    tta, x, y = setting
    spec = make_attack("eot-pgd", eps=EPS, steps=2, eot_iter=1)
    outcomes = []
    for batch in (1, 3, 8):
        evaluation = Evaluation(
            {"atpt": tta}, TensorSource(x, y), spec, None, None, attack_batch_size=batch, sanity=SanityChecks(n=0)
        )
        evaluation.run()
        outcomes.append([(r["position"], r["clean"], r["adv"], r["attack"]["forward"]) for r in evaluation.merged])
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert any(adv != clean for _, clean, adv, _ in outcomes[0])  # the attack fooled some samples
