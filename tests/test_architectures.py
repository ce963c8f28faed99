"""dlf reads each model family as the family's own forward does.

dlf runs every model through its body with a 4D attention mask and position ids of its own,
and through a float32 copy of the output layer (``dlf_plugin.backends.LocalModel``). Here,
for tiny random models of the families users fuse, a left-padded batch of two prompts of 20
and 13 tokens is scored in one pass, and then decoded token by token over a KV cache from a
12-token prefill; every position's logits must equal the family's own forward over the
unpadded prompt. Windows are set to 6 tokens where the family has sliding-window layers, so
every window is outgrown.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from dlf_plugin.backends import LocalModel

V = 128
SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Families, with the options a tiny one needs; those with sliding-window layers get a window of 6.
FAMILIES = {
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": dict(use_sliding_window=True, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, max_window_layers=1), "qwen3_moe": dict(use_sliding_window=True), "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "phi3": {}, "starcoder2": {}, "cohere2": {}, "granite": dict(logits_scaling=8.0), "olmo2": {}, "gpt_neox": {}, "falcon": {},
    # Multi-head latent attention: as many key/value heads as query heads, as in their checkpoints
    # (with fewer, transformers' own forward fails: keys repeated past the queries' heads).
    "deepseek_v2": dict(MLA, q_lora_rank=None, **MOE, first_k_dense_replace=1, n_shared_experts=1),
    "deepseek_v3": dict(MLA, q_lora_rank=16, **MOE, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1),
    "minicpm3": dict(MLA, q_lora_rank=16),
    "glm4": {}, "glm4_moe": {}, "phi": {}, "smollm3": {}, "exaone4": {}, "olmo3": {}, "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "ministral": dict(head_dim=16), "ernie4_5": {}, "seed_oss": {}, "apertus": {}, "hunyuan_v1_dense": dict(head_dim=16), "granitemoe": {},
    "olmoe": {}, "arcee": {}, "bitnet": {}, "stablelm": {}, "nemotron": {},
}
SLIDING = {"mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "starcoder2", "cohere2", "exaone4", "olmo3", "gpt_oss", "ministral"}
WINDOW = 6


def _model(family: str) -> transformers.PreTrainedModel:
    if family not in transformers.CONFIG_MAPPING:  # newer than this transformers (CI installs the newest)
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} models")
    extra = dict(FAMILIES[family])
    if family in SLIDING:
        extra["sliding_window"] = WINDOW
    config = transformers.AutoConfig.for_model(family, **{**SHAPE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # peaked logits, so that a wrong mask shows
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_scoring_and_cached_decoding_equal_the_familys_own_forward(family):
    model = _model(family)
    backend = LocalModel(family, model, V, torch.device("cpu"))
    assert backend.window == (WINDOW if family in SLIDING else None)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=generator) for n in (20, 13)]
    width, prefill = 20, 12
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        own = [model(prompt.unsqueeze(0)).logits[0, :, :V].float() for prompt in prompts]
        backend.check_head(prompts[0][:8].unsqueeze(0))
        scored = backend.hidden(ids, mask, positions)
        cache = backend.new_cache(2, width)
        decoded = [backend.hidden(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill], cache, last=1)]
        for slot in range(prefill, width):
            decoded.append(backend.hidden(ids[:, slot : slot + 1], mask[:, : slot + 1], positions[:, slot : slot + 1], cache))
        decoded = torch.cat(decoded, dim=1)  # slots prefill - 1 .. width - 1
        for row, prompt in enumerate(prompts):
            pad = width - len(prompt)
            assert torch.allclose(backend.logits(scored[row, pad:]), own[row], atol=2e-5), (family, row)
            first = prefill - 1 - pad  # the prompt's position at the prefill's last slot
            assert torch.allclose(backend.logits(decoded[row, max(0, -first):]), own[row][max(0, first):], atol=2e-5), (family, row)
