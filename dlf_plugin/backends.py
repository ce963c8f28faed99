"""One model behind the small interface the engine calls: hidden states, then float32 logits.

The engine never asks a model for its logits directly. It asks for the last hidden states
of the positions it fuses (``hidden``), and turns chosen rows of them into logits over the
common vocabulary, in float32, when it needs them (``logits``). Two things follow
(DESIGN.md section 5):

- precision: a bf16 or fp16 model's output layer runs with float32 output, so its logits
  are not rounded to 8 (or 11) bits of mantissa before the solver's KL targets, which are
  small differences of them, are formed;
- memory: scoring keeps ``[positions, H]`` hidden states, not ``[positions, V]`` logits, and
  the engine makes logits a chunk of rows at a time.

The float32 head costs one ``[rows, H] x [H, V]`` product per model per step, as the
model's own head does. Where the device has a half-precision matmul with float32 output
(``torch.mm(..., out_dtype=float32)``, CUDA) nothing else is needed; elsewhere the
backend keeps a float32 copy of the output layer's ``V x H`` weights (Llama-2-13B:
0.66 GB beside 26 GB of bf16 weights; Qwen2.5-7B: 2.2 GB beside 15 GB).
"""

from __future__ import annotations

import inspect
import logging

import torch
import transformers

from dlf_plugin.errors import DLFError

logger = logging.getLogger(__name__)


class ModelFault(DLFError, RuntimeError):
    """A model gave logits dlf cannot fuse (NaN or infinity, or a head it cannot split); the
    message names the model."""


# Config attributes that carry a context length, checked in this order (lm-eval's too).
CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
# A tokenizer's model_max_length at or above this means "not set" (transformers' 1e30).
TOKENIZER_UNSET = 10**18


class LocalModel:
    """A transformers causal LM: its body gives hidden states, its output layer float32 logits.

    Args:
        name: the model's registry name (used in every error).
        model: the loaded model.
        vocab_size: the common vocabulary V; output rows past it are never computed.
        device: where logits are returned (the large model's device).
    """

    def __init__(self, name: str, model: transformers.PreTrainedModel, vocab_size: int, device: torch.device) -> None:
        self.name = name
        self.model = model
        self.vocab_size = vocab_size
        self.device = device
        self.model_device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache (the old name goes in 5.40).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keeps = "logits_to_keep" in params
        # transformers before 5 takes the cache slots to write as cache_position; without it,
        # the model reads the cache's length back from the device at every step.
        self._positions = "cache_position" in params
        self.body = model.base_model if model.base_model is not model else None
        head = model.get_output_embeddings()
        self.own_head = self.body is None or not isinstance(head, torch.nn.Linear)
        # The model's own forward scales or soft-caps its logits; dlf does it where it runs the head itself.
        text = text_config(model.config)
        self.scale = None if self.own_head else _logit_scale(text)
        self.softcap = None if self.own_head else getattr(text, "final_logit_softcapping", None)
        self._per_kind, self.window = attention_layout(name, model.config)
        self.bias = None
        if not self.own_head:
            self.weight = head.weight[:vocab_size]  # [V, H], a view
            self.bias = None if head.bias is None else head.bias[:vocab_size].float()
            self._mode = "float32" if self.weight.dtype == torch.float32 else _half_head_mode(self.weight)
            if self._mode == "copy":
                self.weight = self.weight.float()
        else:
            self._mode = "own"
            logger.warning(
                "dlf: model %s has no plain linear output layer under its body; its logits come from its "
                "own forward in %s and are upcast afterwards", name, next(model.parameters()).dtype,
            )

    @property
    def head_mode(self) -> str:
        """How float32 logits are made: ``float32`` (a float32 model), ``out_dtype`` (a
        half-precision matmul with float32 output), ``copy`` (a float32 copy of the output
        layer) or ``own`` (the model's own head, upcast: architectures dlf cannot split)."""
        return self._mode

    def context_length(self, tokenizer=None) -> int | None:
        """The longest context the model was trained for: its config, else its tokenizer."""
        configs = [getattr(self.model.config, "text_config", None), self.model.config]
        for config in configs:
            for attr in CONTEXT_ATTRS:
                value = getattr(config, attr, None) if config is not None else None
                if isinstance(value, int) and value > 0:
                    return value
        limit = getattr(tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < TOKENIZER_UNSET else None

    @property
    def static_cache(self) -> bool:
        """Whether decoding preallocates this model's KV cache (transformers' StaticCache): for
        models transformers can compile whole, without sliding-window layers."""
        return bool(getattr(self.model, "_can_compile_fullgraph", False)) and self.window is None

    def new_cache(self, batch: int, length: int, preallocated: bool = True):
        """A KV cache for ``batch`` rows of at most ``length`` tokens: preallocated where the
        model allows (fixed shapes, so a step can be compiled or captured) and asked for,
        else growing."""
        if preallocated and self.static_cache:
            cache = transformers.StaticCache(config=self.model.config, max_cache_len=length)
            cache.dlf_length = length  # transformers names the length differently across versions
            return cache
        return transformers.DynamicCache()

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, last: int | None = None) -> torch.Tensor:
        """Last hidden states ``[B, T, H]`` (``[B, T, V]`` logits for an ``own`` head); with
        ``last``, of the last ``last`` positions only, in memory of their own (a prefill's
        other states are freed as it returns)."""
        kwargs = {"use_cache": cache is not None}
        if attention_mask is not None:
            bias = self._attention_bias(attention_mask.to(self.model_device), input_ids.shape[1])
            if isinstance(cache, transformers.StaticCache):  # keys: every preallocated slot
                slots = cache.dlf_length - bias.shape[-1]
                bias = torch.nn.functional.pad(bias, (0, slots), value=torch.finfo(bias.dtype).min)
            kwargs["attention_mask"] = bias
            kwargs["position_ids"] = position_ids.to(self.model_device)
            if self._positions and cache is not None:
                keys = attention_mask.shape[1]
                kwargs["cache_position"] = torch.arange(keys - input_ids.shape[1], keys, device=self.model_device)
        if cache is not None:
            kwargs[self.cache_arg] = cache
        ids = input_ids.to(self.model_device)
        if self.own_head:
            if self._keeps:
                kwargs["logits_to_keep"] = last or 0
            states = self.model(ids, **kwargs).logits[..., : self.vocab_size]
        else:
            states = self.body(ids, **kwargs).last_hidden_state
        if last is not None and last < states.shape[1]:
            states = states[:, -last:].clone()
        return states

    def _attention_bias(self, mask: torch.Tensor, queries: int):
        """The 4D additive mask ``[B, 1, queries, keys]`` for a 2D padding mask ``[B, keys]``
        whose last ``queries`` positions are being run: causal and padding together, and for
        sliding-window layers the window too; for a model with both kinds of layer, one
        mask per kind (``{"full_attention": ..., "sliding_attention": ...}``, as its forward
        takes them).

        transformers builds this itself from a 2D mask, but first checks on the host whether
        the mask has any padding at all (a device sync at every step); a 4D mask is used as
        is, so the window is dlf's to apply. It is counted in tokens, not cache slots: a key
        is seen while its position is less than ``window`` before the query's. Positions are
        the open slots counted from the left, so left padding and the drafts a speculative
        round refused (masked, their positions reused) take no place in the window.
        """
        keys = mask.shape[1]
        query_slot = torch.arange(keys - queries, keys, device=mask.device).unsqueeze(-1)  # [q, 1]
        causal = torch.arange(keys, device=mask.device) <= query_slot  # [q, keys]
        allowed = causal & mask.bool()[:, None, None, :]  # [B, 1, q, keys]
        if self.window is None:
            return self._additive(allowed)
        positions = mask.long().cumsum(-1)  # [B, keys]: one more than each open slot's position
        near = positions[:, -queries:, None] - positions[:, None, :] < self.window  # [B, q, keys]
        sliding = self._additive(allowed & near.unsqueeze(1))
        return {"full_attention": self._additive(allowed), "sliding_attention": sliding} if self._per_kind else sliding

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits ``[M, V]`` on the fusion device from hidden states ``[M, H]``,
        written into ``out`` (``[M, V]`` float32, any row stride) when given."""
        here = out if out is not None and out.device == self.model_device else None
        if self._mode == "own":
            logits = hidden.float() if here is None else here.copy_(hidden)
        elif self._mode == "out_dtype":
            logits = torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
            logits = logits if here is None else here.copy_(logits)
        else:
            logits = torch.mm(hidden.float(), self.weight.t(), out=here)
        if self.bias is not None:
            logits.add_(self.bias)
        if self.scale is not None:
            logits.mul_(self.scale)
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        if out is None:
            return logits.to(self.device)
        return out if here is not None else out.copy_(logits)

    def check_head(self, probe: torch.Tensor) -> None:
        """Compare ``logits(hidden(probe))`` with the model's own forward on a few tokens.

        Ours is read as every scoring and decoding pass reads: with the 4D attention mask and
        the position ids dlf passes.

        Raises:
            ModelFault: a forward that fails on dlf's mask and position ids, NaN or infinite
                logits (broken weights), or logits that differ beyond the rounding of the
                model's dtype (a head that is more than a linear layer, masks the model does
                not read as dlf means them); the message names the model.
        """
        with torch.no_grad():
            try:
                ours = self.logits(self.hidden(probe, torch.ones_like(probe), torch.arange(probe.shape[1]).unsqueeze(0))[0])
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise ModelFault(
                    f"model {self.name}: its forward fails on the 4D attention mask and position ids dlf passes "
                    f"({type(exc).__name__}: {exc}); dlf cannot run this architecture, please report it"
                ) from exc
            theirs = self.model(probe.to(self.model_device), use_cache=False).logits[0, :, : self.vocab_size].float().to(self.device)
        if not bool(torch.isfinite(theirs).all() and torch.isfinite(ours).all()):
            raise ModelFault(
                f"model(s) {self.name} gave NaN or infinite logits on a {probe.shape[1]}-token probe at load "
                "(a broken checkpoint, or overflow in float16: try dtype=bfloat16 or float32)"
            )
        # A half-precision head rounds each logit to its dtype's spacing; allow that and a little more.
        eps = torch.finfo(self.model.dtype).eps
        tolerance = 4 * eps * theirs.abs().amax().item() + 1e-4
        error = (ours - theirs).abs().amax().item()
        if not error <= tolerance:
            raise ModelFault(
                f"model {self.name}: logits from its last hidden state through its output layer differ from "
                f"its own forward by {error:.3g} (tolerance {tolerance:.3g}); dlf cannot split this architecture's "
                "head or mask its attention, please report it"
            )


def text_config(config):
    """The config of a model's language part (a multimodal wrapper's ``text_config``), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# The kinds of attention layer whose masks dlf builds (``LocalModel._attention_bias``).
MASKED_KINDS = ("full_attention", "sliding_attention")


def attention_layout(name: str, config) -> tuple[bool, int | None]:
    """How ``name``'s layers attend, from its (text) config: (whether its forward takes one
    mask per kind of layer, the sliding window in tokens or None where no layer slides).

    A config with ``layer_types`` names each layer's kind (Gemma 2 and 3, Qwen 2 and 3,
    Cohere 2, ...): its forward takes a dict of masks by kind. Without it, every layer
    slides where ``sliding_window`` is set (Mistral, Mixtral, Phi-3, Starcoder 2), else none.

    Raises:
        ModelFault: a kind of layer dlf cannot mask (chunked or linear attention, state-space
            layers), or sliding layers without a window; the message names the model.
    """
    config = text_config(config)
    kinds = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if kinds is None:
        return False, window or None
    unknown = sorted(set(kinds) - set(MASKED_KINDS))
    if unknown:
        raise ModelFault(
            f"model {name} has layers of kind {', '.join(unknown)}; dlf builds the attention masks itself and "
            f"knows only {' and '.join(MASKED_KINDS)}, so it cannot run this architecture correctly (please report it)"
        )
    if "sliding_attention" not in kinds:
        return False, None
    if not isinstance(window, int) or window < 1:
        raise ModelFault(f"model {name} has sliding-window layers but its config's sliding_window is {window!r}; set it to the window in tokens")
    return True, window


def _logit_scale(config) -> float | None:
    """What a model's head multiplies its logits by after the linear layer: Cohere's
    ``logit_scale``, one over Granite's ``logits_scaling``; None where it does not scale."""
    if getattr(config, "logit_scale", None):
        return float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        return 1.0 / float(config.logits_scaling)
    return None


def _half_head_mode(weight: torch.Tensor) -> str:
    """``out_dtype`` where this device multiplies half-precision matrices into float32, else ``copy``."""
    probe = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        torch.mm(probe, weight[:2].t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return "copy"
    return "out_dtype"
