"""Small, seeded Llama models and a byte-level BPE tokenizer, saved as real checkpoints;
seeded logits shaped like a model's for the solvers.

No hub is reachable where dlf is tested, so tests, benchmarks and the demo build
their models here and load them back through ``from_pretrained``, the same path a
user's checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from dlf_plugin.fusion import FusionInputs

# Text the tokenizer's merges are learnt from; any text still encodes (byte-level).
_CORPUS = [
    "Question: What is the capital of the kingdom of Varn?\nAnswer: The capital of Varn is Oskel.",
    "The river Tesh flows north through the valley of Amor and reaches the sea at Pellin.",
    "Answer the following question.\n\nQuestion: Mira has 3 apples and buys 4 more. How many now?\nAnswer: 7 #### 7",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0123456789 + - * / = ( ) , ; :",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def make_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that prepends BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, model_max_length=512
    )


def make_llama(
    vocab_size: int,
    seed: int,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> transformers.LlamaForCausalLM:
    """A randomly initialised Llama with the given shape, deterministic in ``seed``."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger output weights than the default init, so that the models disagree
        # clearly and fusion changes which token wins.
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


def save(model: transformers.PreTrainedModel, tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` both, as safetensors."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def peaked_fusion_inputs(rows: int, pairs: int, vocab: int, seed: int) -> FusionInputs:
    """Solver inputs like a model's: peaked, heavy-tailed logits (a few likely tokens, a long
    tail) for the large base and each small base, experts shifted from their base."""
    gen = torch.Generator().manual_seed(seed)

    def peaked(*shape):
        x = torch.randn(*shape, generator=gen) * 2.5
        top = torch.randint(0, vocab, (*shape[:-1], 8), generator=gen)
        return x.scatter_add(-1, top, torch.rand(*shape[:-1], 8, generator=gen) * 12)

    base = peaked(rows, vocab)
    small = peaked(rows, pairs, vocab)
    expert = small + torch.randn(rows, pairs, vocab, generator=gen) * 0.8
    return FusionInputs(base, small, expert, torch.ones(rows, dtype=torch.bool))


def save_gguf(folder: str | Path, out: str | Path) -> Path:
    """A Llama checkpoint with a byte-level BPE tokenizer (these tiny models, the toy
    world's) as one float32 GGUF file that llama.cpp serves; needs the ``gguf`` package.

    Attention's query and key rows are reordered from transformers' rotary layout (halves)
    to llama.cpp's (interleaved pairs). The special tokens are written as user-defined, so
    that a server renders them as their text (``</s>``), not as "" like a byte piece of a
    split character.
    """
    import json

    import gguf
    from safetensors.torch import load_file

    folder, out = Path(folder), Path(out)
    config = transformers.AutoConfig.from_pretrained(folder)
    if config.model_type != "llama":
        raise ValueError(f"{folder}: save_gguf writes Llama checkpoints, not {config.model_type}")
    spec = json.loads((folder / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE" or spec.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise ValueError(f"{folder}: save_gguf writes byte-level BPE tokenizers only")
    vocab = spec["model"]["vocab"]
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.get)
    special = {added["content"] for added in spec.get("added_tokens", []) if added.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.USER_DEFINED if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if "<unk>" in vocab:
        writer.add_unk_token_id(vocab["<unk>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def interleaved(weight: torch.Tensor, n: int) -> torch.Tensor:
        rows, cols = weight.shape
        return weight.reshape(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    for name, tensor in weights.items():
        tensor = tensor.float()
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                tensor = interleaved(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = interleaved(tensor, kv_heads)
            target = f"blk.{layer}.{per_layer[module]}.weight"
        else:
            target = names[name]
        writer.add_tensor(target, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
