"""What every test-time adapter shares: input checks, the model's state, per-image seeds,
the components (input defence, explainer, augmenter, aggregator, objective) and the views."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Optional, Sequence

import torch
from torch import nn

from .aggregators import AGGREGATORS
from .augmenters import AUGMENTERS, center_view
from .config import AdapterConfig
from .explainers import build_explainer
from .input_defences import INPUT_DEFENCES
from .inputs import check_images, quantize_images
from .objectives import OBJECTIVES
from .registry import resolve


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Run `model` in eval mode and give every submodule back its own training flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class EpisodicAdapter(nn.Module):
    """What every test-time adapter shares: input checks, the model's state, per-image
    seeding, the explainer and the views. Subclasses say what is tuned (`adapt_images`), how
    many outputs there are (`num_outputs`) and what the explainer explains (`explanation_score`).
    """

    def __init__(self, model: nn.Module, backbone, config: AdapterConfig, name: str):
        super().__init__()
        self.name = name
        self.config = config
        self.model = model
        self.backbone = backbone

    def build_components(self):
        """Names are looked up in their registries, objects are used as given."""
        config = self.config
        self.augmenter = resolve(AUGMENTERS, config.augmenter, config)
        self.aggregator = resolve(AGGREGATORS, config.aggregator, config)
        self.objective = resolve(OBJECTIVES, config.objective, config)
        defence = config.input_defence
        self.input_defence = None if defence is None else resolve(INPUT_DEFENCES, defence, config)
        needs_maps = (config.views > 1 and self.augmenter.needs_maps) or self.aggregator.needs_view_maps
        self.explainer = build_explainer(config, self.backbone) if needs_maps else None

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def explanation_score(self):
        raise NotImplementedError

    def adapt_images(self, images: torch.Tensor, track_input: bool = False) -> torch.Tensor:
        """(B, outputs) for (B,3,H,W) images, each adapted on its own."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images)
        track_input = torch.is_grad_enabled() and images.requires_grad
        with torch.inference_mode(False), torch.enable_grad(), evaluation_mode(self.model):
            if images.is_inference():
                images = images.clone()
            images = images.to(self.backbone.device)
            if len(images) == 0:
                return torch.empty(0, self.num_outputs, device=self.backbone.device)
            if self.input_defence is not None:
                images = self.defend(images, track_input)
            return self.adapt_images(images, track_input)

    def defend(self, images: torch.Tensor, track_input: bool) -> torch.Tensor:
        """The input defence's images, each seeded from the seed and the image as given; they stay
        in the input's graph only when the caller differentiates (an adaptive attack)."""
        host = images.detach().float().cpu()
        with self.image_precision():
            defended = self.input_defence(self.backbone, images, [self.generator_for(image) for image in host])
        return defended if track_input else defended.detach()

    def explain(self, images: torch.Tensor, explainer: Optional[str] = None) -> torch.Tensor:
        """Attention maps (N, h, w) in [0,1] of [0,1] images at the model's input size, by the
        configured explainer or the one named (e.g. "grad_rollout", to compare)."""
        if explainer is not None:
            explainer = build_explainer(self.config, self.backbone, explainer)
        else:
            explainer = self.explainer or build_explainer(self.config, self.backbone)
        with torch.inference_mode(False), evaluation_mode(self.model), self.image_precision():
            return explainer(self.backbone, images, self.explanation_score())

    def image_precision(self):
        """Autocast for the image-tower passes (`precision`); text and tuning stay in fp32."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.backbone.device.type, dtype=dtype)

    def make_views(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(K,3,S,S): the center crop, then K-1 augmented views of one (3,H,W) image."""
        return self.make_view_sets(image.unsqueeze(0), [generator])[0]

    def make_view_sets(self, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(B,K,3,S,S): `make_views` of each image with its own generator, the bases of all
        images through the explainer in one pass; images are first quantised as
        `input_quantization` says (all views, view 0 included, come from the quantised image)."""
        images = quantize_images(images, self.config.input_quantization)
        size = self.backbone.image_size
        firsts = torch.stack([center_view(image, size) for image in images]).unsqueeze(1)
        if self.config.views == 1:
            return firsts
        bases = torch.stack(
            [
                self.augmenter.bases(image, self.config.views - 1, generator, size)
                for image, generator in zip(images, generators)
            ]
        )
        maps = None
        if self.augmenter.needs_maps:
            maps = self.explain(bases.detach().flatten(0, 1)).unflatten(0, bases.shape[:2])
        views = [
            self.augmenter.views(bases[i], None if maps is None else maps[i], generator)
            for i, generator in enumerate(generators)
        ]
        return torch.cat([firsts, torch.stack(views)], dim=1)

    def generator_for(self, image: torch.Tensor) -> torch.Generator:
        """Randomness that depends only on the seed and the image itself, not on its batch."""
        if self.config.seed is None:
            return torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        digest = hashlib.blake2b(
            image.detach().float().cpu().numpy().tobytes(), digest_size=8, key=self.config.seed.to_bytes(8, "little")
        )
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
