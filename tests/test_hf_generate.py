"""Greedy generation on imported Hugging Face models equals transformers' own greedy
`generate` token for token (GQA + llama3 RoPE scaling, Mistral's sliding window, GPT-2's
learned positions), for a batch of prompts of different lengths."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_models  # noqa: E402
import jax  # noqa: E402

from framework.generate import generate  # noqa: E402
from framework.hf import load  # noqa: E402

NEW_TOKENS = 12
EOS = 2  # hf_models' eos_token_id: both sides stop after it
PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 11, 23]]  # lengths 7 and 3: right-padded batch


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["llama3_gqa", "mistral_window", "gpt2"])
def test_greedy_tokens_equal_transformers(tmp_path, name):
    model = hf_models.build(name)
    model.save_pretrained(tmp_path / name)
    cfg, params, _ = load(tmp_path / name)
    cfg = cfg.model_copy(update={"attention_impl": "xla", "norm_impl": "xla"})
    with jax.default_matmul_precision("highest"):
        ours = generate(
            params, cfg, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=EOS
        )
    want = [_hf_greedy(model, p) for p in PROMPTS]
    assert ours == want, name
    assert ours[0] != ours[1] and len(set(ours[0])) > 1  # not a constant stream
