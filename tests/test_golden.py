"""Refactors change no result: every preset's logits equal those recorded before them."""

import pytest
import torch
from golden import GOLDEN, preset_outputs


@pytest.mark.usefixtures("one_thread")
def test_every_preset_reproduces_its_recorded_logits(tokenizer):
    recorded = torch.load(GOLDEN)
    produced = preset_outputs(tokenizer)
    assert produced.keys() == recorded.keys()
    for key, logits in produced.items():
        torch.testing.assert_close(logits, recorded[key], rtol=0, atol=0, msg=f"{key} changed")
