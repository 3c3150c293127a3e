"""Every preset but `atpt_official` gives the logits recorded before the official-code settings
were added (tests/record_preset_logits.py): their defaults must leave the other presets as they were."""
import json

import pytest
import torch

from record_preset_logits import RECORD, cases, preset_logits

RECORDED = json.loads(RECORD.read_text())


@pytest.mark.parametrize("preset, model_kind", cases())
def test_preset_logits_are_unchanged(preset, model_kind, tokenizer, one_thread):
    expected = torch.tensor(RECORDED[f"{preset}/{model_kind}"])
    torch.testing.assert_close(preset_logits(preset, model_kind, tokenizer), expected, rtol=1e-5, atol=1e-5)
