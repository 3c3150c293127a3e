"""Threat models: the attacked zero-shot model, eps units, attacks by name, the adversarial cache."""

import pytest
import torch
from atpt_plugin.adapters.attacks import ATTACKS, ZeroShotClassifier, chunk_seed, make_attack, parse_eps, run_attack
from atpt_plugin.adapters.cache import AdversarialCache, CacheMismatchError, model_fingerprint, tensor_digest
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit

from atpt_plugin import AdapterConfig
from atpt_plugin.adapter import TestTimeAdapter as Wrapped  # not collected as a test class
from atpt_plugin.registry import UnknownNameError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def zero_shot(tiny_vit, tokenizer):
    return ZeroShotClassifier.build(tiny_vit, CLASSNAMES, tokenizer)


def test_zero_shot_classifier_equals_the_zeroshot_adapter_batched(tiny_vit, tokenizer, zero_shot):
    reference = Wrapped(tiny_vit, CLASSNAMES, tokenizer, AdapterConfig(views=1, steps=0, aggregator="single"))
    x = torch.rand(4, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(zero_shot(x), reference(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(zero_shot(x).logsumexp(-1).sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0  # differentiable w.r.t. the input
    with_domain = ZeroShotClassifier.build(tiny_vit, CLASSNAMES, tokenizer, domain_word="pet")
    assert with_domain.prompt_phrase == "a pet photo of a" and zero_shot.prompt_phrase == "a photo of a"


def test_paper_protocol_defaults_per_backbone():
    vit = make_attack("pgd")
    assert (vit.norm, vit.eps, vit.param_dict) == (
        "Linf",
        4 / 255,
        {"alpha": 1 / 255, "random_start": True, "steps": 100},
    )
    resnet = make_attack("PGD", backbone_kind="resnet")
    assert resnet.eps == 1 / 255 and resnet.param_dict["steps"] == 1 and resnet.param_dict["alpha"] == 0.25 / 255
    assert vit.describe() == "pgd (Linf, eps=4/255, alpha=1/255, random_start=True, steps=100)"


def test_eps_units_are_unambiguous():
    assert parse_eps("4") == parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.5/255") == pytest.approx(0.5 / 255)
    assert parse_eps("0.5", norm="L2") == 0.5 and parse_eps("255/255", norm="L2") == 1.0
    with pytest.raises(ValueError, match=r"ambiguous.*1/255 units.*--eps 4"):
        parse_eps("0.0157")
    for bad in ("0", "-4", "abc", "nan", "1/0"):
        with pytest.raises(ValueError):
            parse_eps(bad)
    with pytest.raises(ValueError, match=r"not in \[0,1\] pixel units.*eps=4/255"):
        make_attack("pgd", eps=4)
    with pytest.raises(ValueError, match="plain gray"):
        make_attack("fgsm", eps=0.6)
    with pytest.raises(ValueError, match="plain gray"):
        make_attack("pgdl2", eps=30.0, image_size=32)
    with pytest.raises(ValueError, match="alpha"):
        make_attack("pgd", eps=4 / 255, alpha=8 / 255)
    with pytest.raises(ValueError, match="takes no eps"):
        make_attack("cw", eps=4 / 255)


def test_unknown_attack_and_parameter_list_the_valid_ones():
    with pytest.raises(
        UnknownNameError,
        match=r"no attack named 'pgdd'.*installed attacks: apgd-eot, autoattack, cw, eot-pgd, "
        r"fgsm, none, pgd, pgdl2, square. .*atpt_plugin.attacks",
    ):
        make_attack("pgdd")
    with pytest.raises(ValueError, match="no parameter 'kappa'; its parameters: eps, steps, alpha, random_start"):
        make_attack("pgd", kappa=1)
    assert make_attack("aa").name == "autoattack" and make_attack("PGD-L2").name == "pgdl2"
    assert make_attack("autoattack", norm="L2").norm == "L2"


@pytest.mark.parametrize(
    "name, params", [("pgd", dict(steps=3)), ("fgsm", {}), ("pgdl2", dict(steps=3)), ("cw", dict(steps=3))]
)
def test_attacks_by_name_respect_their_budget(zero_shot, name, params):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = zero_shot(x).argmax(1)  # every image correct: an attack has something to do
    spec = make_attack(name, **params)
    adversarial = run_attack(spec, zero_shot, x, y, seed=5)
    assert adversarial.shape == x.shape and 0 <= adversarial.min() and adversarial.max() <= 1
    delta = (adversarial - x).flatten(1)
    if spec.norm == "Linf":
        assert delta.abs().max() <= spec.eps + 1e-6
    elif spec.eps is not None:
        assert delta.norm(dim=1).max() <= spec.eps + 1e-4
    else:  # CW has no eps: it returns a misclassified image, or the clean one where it found none
        with torch.no_grad():
            fooled = zero_shot(adversarial).argmax(1) != y
        assert fooled.any() and (fooled | (delta.abs().amax(dim=1) == 0)).all()
    assert torch.equal(adversarial, run_attack(spec, zero_shot, x, y, seed=5))  # seeded
    if spec.param_dict.get("random_start"):
        assert not torch.equal(adversarial, run_attack(spec, zero_shot, x, y, seed=6))


def test_pgd_lowers_the_true_class_logit_and_is_batch_independent(zero_shot):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    spec = make_attack("pgd", eps=16 / 255, steps=5)
    adversarial = run_attack(spec, zero_shot, x, y, seed=0)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy
        assert loss(zero_shot(adversarial), y) > loss(zero_shot(x), y)
    # a batch's random start depends on the seed alone: a prefix of it is attacked alike
    torch.testing.assert_close(run_attack(spec, zero_shot, x[:2], y[:2], seed=0), adversarial[:2])


def test_autoattack_by_name_attacks_correct_images_and_skips_misclassified_ones(zero_shot):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predictions = zero_shot(x).argmax(1)
    wrong = (predictions + 1) % len(CLASSNAMES)
    spec = make_attack("autoattack", eps=8 / 255)
    assert torch.equal(run_attack(spec, zero_shot, x, wrong, seed=0), x)  # only correct images are attacked
    labels = torch.cat([predictions[:2], wrong[2:]])  # images 0 and 1 correct, image 2 not
    adversarial = run_attack(spec, zero_shot, x, labels, seed=0)
    assert torch.equal(adversarial[2], x[2])
    change = (adversarial - x)[:2].flatten(1).abs().max(dim=1).values
    assert (change > 0).all() and (change <= spec.eps + 1e-6).all()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy
        assert (
            loss(zero_shot(adversarial[:2]), labels[:2], reduction="none")
            > loss(zero_shot(x[:2]), labels[:2], reduction="none")
        ).all()


def test_attack_on_a_resnet_tower(tokenizer):
    model = make_tiny_resnet()
    zero_shot = ZeroShotClassifier.build(model, CLASSNAMES, tokenizer)
    spec = make_attack("pgd", backbone_kind="resnet")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    adversarial = run_attack(spec, zero_shot, x, y, seed=0)
    assert 0 < (adversarial - x).abs().max() <= 1 / 255 + 1e-6
    with torch.no_grad():  # one step of 0.25/255: small, but the loss of each image rises
        loss = torch.nn.functional.cross_entropy
        assert (loss(zero_shot(adversarial), y, reduction="none") > loss(zero_shot(x), y, reduction="none")).all()


def test_cache_checks_its_key_ids_and_clean_images(tmp_path):
    key = {"dataset": "pets", "attack_name": "pgd", "model": "abc", "seed": 0}
    cache = AdversarialCache(tmp_path, key)
    clean = torch.rand(2, 3, 4, 4)
    labels = torch.tensor([0, 1])
    digest = tensor_digest(clean, labels)
    cache.save(0, ["a.jpg", "b.jpg"], digest, clean * 0.5)
    again = AdversarialCache(tmp_path, key)
    assert torch.equal(again.load(0, ["a.jpg", "b.jpg"], digest), clean * 0.5)
    assert again.load(2, ["c.jpg", "d.jpg"], digest) is None  # not made yet
    with pytest.raises(CacheMismatchError, match="other clean images"):
        again.load(0, ["a.jpg", "b.jpg"], tensor_digest(clean + 0.1, labels))
    with pytest.raises(CacheMismatchError, match="dataset selection changed"):
        again.load(0, ["b.jpg", "a.jpg"], digest)
    other = AdversarialCache(tmp_path, {**key, "seed": 1})  # another key: another folder
    assert other.directory != again.directory and other.load(0, ["a.jpg", "b.jpg"], digest) is None
    (again.directory / "key.json").write_text('{"dataset": "dtd"}')  # a tampered folder
    with pytest.raises(CacheMismatchError, match="different key.*dataset"):
        AdversarialCache(tmp_path, key)


def test_fingerprints_and_chunk_seeds():
    assert model_fingerprint(make_tiny_vit(seed=0)) == model_fingerprint(make_tiny_vit(seed=0))
    assert model_fingerprint(make_tiny_vit(seed=0)) != model_fingerprint(make_tiny_vit(seed=1))
    assert chunk_seed(0, 32) == chunk_seed(0, 32) != chunk_seed(0, 64) != chunk_seed(1, 32)
    assert set(ATTACKS.names()) == {"pgd", "fgsm", "pgdl2", "cw", "autoattack", "eot-pgd", "apgd-eot", "square", "none"}


def test_evaluation_adapts_a_batch_in_one_call_and_equals_one_image_at_a_time(tiny_vit, tokenizer, zero_shot):
    from atpt_plugin.adapters.runner import Evaluation
    from atpt_plugin.adapters.sources import TensorSource

    from atpt_plugin import load_adapter

    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 0])
    adapter = load_adapter("rtpt", views=4, rho=0.5)
    batched = adapter.with_overrides(image_batch=4).wrap(tiny_vit, CLASSNAMES, tokenizer)
    alone = adapter.with_overrides(image_batch=1).wrap(tiny_vit, CLASSNAMES, tokenizer)
    calls = []
    batched.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs[0])))
    spec = make_attack("pgd", eps=8 / 255, steps=2)
    evaluation = Evaluation(
        {"batched": batched, "alone": alone}, TensorSource(x, y), spec, zero_shot, None, attack_batch_size=4
    )
    rows = {row.adapter: row for row in evaluation.run()}
    assert calls == [8, 2]  # clean + adversarial images of each batch
    found = {(r["adapter"], r["position"]): (r["clean"], r["adv"]) for r in evaluation.log.records()}
    assert len(found) == 10 and all(found["batched", p] == found["alone", p] for p in range(5))
    assert rows["batched"].clean_correct == rows["alone"].clean_correct and rows["batched"].n == 5
    with torch.no_grad():
        adversarial = run_attack(spec, zero_shot, x[:4], y[:4], chunk_seed(0, 0))
        assert [found["alone", p][1] for p in range(4)] == alone(adversarial).argmax(-1).tolist()
        assert [found["alone", p][0] for p in range(5)] == alone(x).argmax(-1).tolist()
