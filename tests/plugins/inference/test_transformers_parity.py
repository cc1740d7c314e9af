"""Greedy fp32 decoding with the KV-cache engine is token-identical to `transformers`'
LlamaForCausalLM loaded from our Hugging Face export of the same weights."""

import torch

from arbor_titan.checkpoint.hf import dcp_to_hf
from plugins.inference.engine import create_engine
from plugins.inference.loading import load_model
from plugins.inference.sampling import SamplingParams
from tests.conftest import import_or_skip
from tests.plugins.inference.tiny import random_model, save_dcp_checkpoint, tiny_args

transformers = import_or_skip("transformers")

NEW_TOKENS = 64


def test_greedy_64_tokens_match_transformers(tmp_path, tokenizer_path):
    model = random_model(tiny_args(max_seq_len=128))
    checkpoint = save_dcp_checkpoint(model, tmp_path / "dcp", tokenizer_path)
    dcp_to_hf(checkpoint, tmp_path / "hf", emit=lambda _: None)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32
    ).eval()

    loaded = load_model(checkpoint)
    engine = create_engine(loaded.model, loaded.tokenizer, slots=2, max_len=128)
    prompts = [[1, 40, 41, 42, 43], [1, 100, 7]]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [request.output_ids for request in engine.generate(prompts, params)]

    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        assert tokens == out[0, len(prompt) :].tolist()
