"""The straightforward computation the authors' code does, on the same adapter code.

`NaiveTestTimeAdapter` changes only *how often* things are computed, never what:
- the explainer runs one base view at a time, and recomputes the text features of all
  classes for each (docs/method.md §9.7);
- the views go through the image encoder three times (selection, tuning, prediction);
- one test image at a time.
(Cutting the text sequence after the last EOT is exact and tested on its own in
tests/test_backbones.py; its speedup is measured separately by bench/run.py.)
With the same seed it gives the same predictions as `TestTimeAdapter` (tests/test_naive.py).
"""

from __future__ import annotations

import torch

from atpt_plugin.adapter import TestTimeAdapter
from atpt_plugin.episodic import evaluation_mode
from atpt_plugin.explainers import build_explainer, top1_logit_score


class NaiveTestTimeAdapter(TestTimeAdapter):
    def initial_text(self) -> torch.Tensor:
        with torch.no_grad():
            return self.prompt.text_features(self.prompt.initial_context)

    def explain(self, images: torch.Tensor) -> torch.Tensor:
        explainer = self.explainer or build_explainer(self.config, self.backbone)
        maps = []
        with torch.inference_mode(False), evaluation_mode(self.model):
            for image in images:
                score = top1_logit_score(self.initial_text(), self.backbone.logit_scale)
                maps.append(explainer(self.backbone, image.unsqueeze(0), score))
        return torch.cat(maps)

    def adapt_images(self, images: torch.Tensor, track_input: bool = False) -> torch.Tensor:
        return torch.stack([self.adapt_one(image, track_input) for image in images])

    def adapt_one(self, image: torch.Tensor, track_input: bool) -> torch.Tensor:
        views = self.make_views(image, self.generator_for(image))
        self.encode_views(views)  # selection pass
        features = self.encode_views(views)  # tuning pass
        text = self.tune(features) if self.config.steps > 0 else self.initial_text()
        return self.aggregate(views, self.encode_views(views, track_input), text)  # prediction pass
