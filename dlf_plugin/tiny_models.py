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
