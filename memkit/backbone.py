"""How memkit reaches into an arbitrary HuggingFace decoder without editing it.

:class:`Backbone` finds the decoder layers of a causal LM and offers the two operations every
injector needs:

* :meth:`Backbone.layer_kv`: let each decoder layer compute keys and values for a sequence of
  per-layer input vectors (memory), with its own input norm, projections, k-norm and rotary
  embedding at chosen positions. Each layer is briefly replaced in its ``ModuleList`` by a probe that
  calls the real layer on the memory vectors with a capturing cache, so everything the model passes to
  its layers (rotary tables per layer type, masks, ...) comes from the model's own forward.
* :meth:`Backbone.run_decoder`: run the decoder over token embeddings with a pre-filled cache and
  temporary per-layer hooks, to read new memory off a forward pass.

Every module swap and hook is undone when the call returns, also on error.

Family-specific facts live in :data:`LAYER_CONTAINERS` and nowhere else.

Shapes (ein notation): ``l`` memory layers, ``p`` positions, ``d`` hidden size, ``n`` tokens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from memkit.cache import KVCapture, KVCaptured, LayerKV
from memkit.errors import IncompatibleModelError

__all__ = ["INPUT_NORMS", "LAYER_CONTAINERS", "Backbone", "LayerHook"]

#: Where a family keeps its decoder layers, when ``get_decoder().layers`` is not it. Everything else
#: about a family (norms, fused projections, k-norm, rotary per layer type) comes from the model's own
#: code through the probe, so this table stays small.
LAYER_CONTAINERS: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("layers",),
    "gpt2": ("h",),
    "falcon": ("h",),
    "bloom": ("h",),
}

#: Names under which families keep a decoder layer's input normalisation.
INPUT_NORMS: tuple[str, ...] = ("input_layernorm", "ln_1", "attention_norm", "input_norm")

#: ``hook(layer_index, hidden [b, n, d]) -> hidden [b, n, d] | None``
LayerHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class _Probe(nn.Module):
    """Stands in for one decoder layer during :meth:`Backbone.layer_kv`."""

    def __init__(self, layer: nn.Module, index: int, inputs: torch.Tensor, capture: KVCapture) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.inputs = inputs
        self.capture = capture

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        kwargs["past_key_values"] = self.capture
        kwargs["use_cache"] = True
        before = set(self.capture.captured)
        with contextlib.suppress(KVCaptured):
            self.layer(self.inputs, *args, **kwargs)
        new = set(self.capture.captured) - before
        if len(new) != 1:
            raise IncompatibleModelError(
                f"decoder layer {self.index} ({type(self.layer).__name__}) did not hand its keys and values "
                "to the cache exactly once, so memkit cannot compute memory keys and values with it; "
                "memkit supports decoder layers that call `past_key_values.update(key, value, layer_idx)`"
            )
        self.capture.captured[self.index] = self.capture.captured.pop(new.pop())
        return hidden_states


class Backbone:
    """A view of a HuggingFace causal LM's decoder, for reading and writing memory.

    Args:
        model: a ``PreTrainedModel`` with a decoder stack (``model.get_decoder().layers`` or an entry
            of :data:`LAYER_CONTAINERS`). It is never modified outside a memkit call.

    Raises:
        IncompatibleModelError: no decoder layer stack could be found, or a layer does not use the
            ``transformers`` cache API.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        if not isinstance(model, PreTrainedModel):
            raise IncompatibleModelError(
                f"memkit wraps a transformers PreTrainedModel, got {type(model).__name__}; "
                "load the model with AutoModelForCausalLM.from_pretrained(...)"
            )
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self.decoder = self._find_decoder(model)
        self.layers = self._find_layers(self.decoder, self.config)
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self._rotary: nn.Module | None = None
        self._rope_active = False

    # -- positions ------------------------------------------------------------------------------------

    def set_rope_scaling(self, scaling: Mapping[str, Any] | None) -> None:
        """Use ``scaling`` (transformers ``rope_parameters`` keys, e.g. ``{"rope_type": "linear",
        "factor": 2.0}``) for every memkit call, on top of the model's own RoPE settings.

        The model's config and rotary module are left as they are: memkit builds its own rotary module
        from a copy of the config and puts it in place only for the duration of each memkit call.
        """
        if not scaling:
            self._rotary = None
            return
        rotary = getattr(self.decoder, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            raise IncompatibleModelError(
                f"{type(self.decoder).__name__} has no `rotary_emb` module, so memkit cannot apply the recipe's "
                "rope_scaling; remove rope_scaling from the recipe"
            )
        config = copy.deepcopy(self.config)
        params = copy.deepcopy(getattr(config, "rope_parameters", None) or {})
        per_type = params and all(isinstance(v, dict) for v in params.values())
        if per_type:
            params = {key: {**value, **scaling} for key, value in params.items()}
        else:
            params = {**params, **scaling}
        config.rope_parameters = params
        try:
            new = type(rotary)(config=config)
        except Exception as exc:
            raise IncompatibleModelError(
                f"cannot build {type(rotary).__name__} with rope_scaling {dict(scaling)}: {exc}"
            ) from exc
        self._rotary = new.to(self.device)

    @property
    def position_scale(self) -> float:
        """How many times more positions the active RoPE settings cover than the model's own."""
        if self._rotary is None:
            return 1.0
        factors = [float(v.get("factor", 1.0)) for v in _param_sets(self._rotary)]
        return max(factors, default=1.0)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Put memkit's position settings in place for one call (re-entrant); undo them after, also on error."""
        if self._rotary is None or self._rope_active:
            yield
            return
        original = self.decoder.rotary_emb
        self._rope_active = True
        try:
            self.decoder.rotary_emb = self._rotary
            yield
        finally:
            self.decoder.rotary_emb = original
            self._rope_active = False

    # -- discovery ----------------------------------------------------------------------------------

    @staticmethod
    def _find_decoder(model: PreTrainedModel) -> nn.Module:
        try:
            decoder = model.get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            decoder = None
        if decoder is None or decoder is model:
            decoder = getattr(model, model.base_model_prefix, None)
        if not isinstance(decoder, nn.Module):
            raise IncompatibleModelError(
                f"{type(model).__name__} has no decoder stack that memkit can find (tried get_decoder() and "
                f"`{model.base_model_prefix}`); memkit needs a decoder-only causal LM"
            )
        return decoder

    @staticmethod
    def _find_layers(decoder: nn.Module, config: object) -> nn.ModuleList:
        model_type = str(getattr(config, "model_type", ""))
        names = LAYER_CONTAINERS.get(model_type, ("layers",))
        expected = getattr(config, "num_hidden_layers", None)
        for name in (*names, "layers", "h", "blocks"):
            layers = getattr(decoder, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                if expected is not None and len(layers) != expected:
                    continue
                return layers
        raise IncompatibleModelError(
            f"found no list of {expected} decoder layers in {type(decoder).__name__} (model_type "
            f"{model_type!r}); if this family keeps its layers elsewhere, add it to "
            "memkit.backbone.LAYER_CONTAINERS"
        )

    # -- properties -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embeddings(self) -> nn.Module:
        """The model's input embedding module."""
        return self.model.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids must be below this."""
        weight = self.embeddings.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    # -- per-layer pieces -------------------------------------------------------------------------------

    def input_norm(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s own input normalisation applied to ``hidden`` ``[..., d]``.

        Post-norm families without an input norm (OLMo 2) return ``hidden`` unchanged.
        """
        layer = self.layers[index]
        for name in INPUT_NORMS:
            norm = getattr(layer, name, None)
            if isinstance(norm, nn.Module):
                return norm(hidden)
        return hidden

    def attention_projections(self, index: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
        """Layer ``index``'s query and key maps, without positions: ``x [n, d] -> [n, heads, e]``.

        They apply the layer's ``q_proj``/``k_proj`` (or the query and key parts of a fused
        ``qkv_proj``) and any per-head ``q_norm``/``k_norm``. Raises
        :class:`IncompatibleModelError` for an attention module that has neither.
        """
        attn = getattr(self.layers[index], "self_attn", None)
        cfg = self.config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // heads)
        if attn is None:
            raise IncompatibleModelError(f"decoder layer {index} has no `self_attn` module with query and key maps")
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            q_lin, k_lin = attn.q_proj, attn.k_proj

            def raw_q(x: torch.Tensor) -> torch.Tensor:
                return q_lin(x)

            def raw_k(x: torch.Tensor) -> torch.Tensor:
                return k_lin(x)
        elif hasattr(attn, "qkv_proj"):
            fused = attn.qkv_proj

            def raw_q(x: torch.Tensor) -> torch.Tensor:
                return fused(x)[..., : heads * head_dim]

            def raw_k(x: torch.Tensor) -> torch.Tensor:
                return fused(x)[..., heads * head_dim : (heads + kv_heads) * head_dim]
        else:
            raise IncompatibleModelError(
                f"decoder layer {index}'s attention ({type(attn).__name__}) has neither q_proj/k_proj nor qkv_proj"
            )

        def shaped(flat: torch.Tensor, norm: object, count: int) -> torch.Tensor:
            # A norm over the whole projection (OLMo 2) comes before the split into heads, a per-head
            # norm (Qwen 3, Gemma 3) after it.
            weight = getattr(norm, "weight", None)
            whole = (
                isinstance(norm, nn.Module) and isinstance(weight, torch.Tensor) and weight.numel() == flat.shape[-1]
            )
            if whole:
                assert isinstance(norm, nn.Module)
                flat = norm(flat)
            out = flat.view(*flat.shape[:-1], count, head_dim)
            return norm(out) if isinstance(norm, nn.Module) and not whole else out

        def query(x: torch.Tensor) -> torch.Tensor:
            return shaped(raw_q(x), q_norm, heads)

        def key(x: torch.Tensor) -> torch.Tensor:
            return shaped(raw_k(x), k_norm, kv_heads)

        return query, key

    def layer_kv_single(self, index: int, vectors: torch.Tensor, position_ids: torch.Tensor) -> LayerKV:
        """Keys and values layer ``index`` computes for ``vectors`` ``[g, d]`` at ``position_ids`` ``[g]``.

        Unlike :meth:`layer_kv` it calls only that layer (through ``forward``, so memkit's own hooks do
        not fire), with rotary tables from the decoder's ``rotary_emb`` (called with the layer's type
        when the model has per-type tables, as Gemma 3 does). Used inside a forward pass, to add the
        keys and values of retrieved long-term memory once a layer's query is known.
        """
        layer = self.layers[index]
        hidden = vectors.unsqueeze(0).to(dtype=self.dtype)
        pos = position_ids.to(hidden.device).unsqueeze(0)
        kwargs: dict[str, Any] = {"position_ids": pos, "attention_mask": None}
        rotary = getattr(self.decoder, "rotary_emb", None)
        if isinstance(rotary, nn.Module):
            layer_types = getattr(self.config, "layer_types", None)
            if _takes_layer_type(type(rotary).forward) and layer_types:
                kwargs["position_embeddings"] = rotary(hidden, pos, layer_types[index])
            else:
                kwargs["position_embeddings"] = rotary(hidden, pos)
        capture = KVCapture()
        with contextlib.suppress(KVCaptured):
            layer.forward(hidden, past_key_values=capture, use_cache=True, **kwargs)
        if len(capture.captured) != 1:
            raise IncompatibleModelError(f"decoder layer {index} did not hand its keys and values to the cache")
        return next(iter(capture.captured.values()))

    # -- operations -----------------------------------------------------------------------------------

    def layer_kv(self, inputs: torch.Tensor, position_ids: torch.Tensor) -> list[LayerKV]:
        """Keys and values that each decoder layer computes for its own input vectors.

        Args:
            inputs: ``[l, p, d]``, the input of layer ``i`` at each of the ``p`` positions.
            position_ids: ``[p]``, the position of each vector (it sets the rotary embedding).

        Returns:
            per layer, ``(keys, values)``, each ``[1, h, p, e]``: exactly what that layer would put
            in its cache had it seen these vectors as its input.
        """
        num, length, _ = inputs.shape
        if num != self.num_layers:
            raise IncompatibleModelError(f"memory has {num} layers but the model has {self.num_layers}")
        capture = KVCapture()
        dummy = torch.zeros(1, length, self.hidden_size, dtype=inputs.dtype, device=inputs.device)
        probes = [_Probe(layer, i, inputs[i : i + 1], capture) for i, layer in enumerate(self.layers)]
        with self._swapped(probes):
            self.decoder(
                inputs_embeds=dummy,
                position_ids=position_ids.to(inputs.device).unsqueeze(0),
                past_key_values=capture,
                use_cache=True,
            )
        return [capture.captured[i] for i in range(self.num_layers)]

    @contextlib.contextmanager
    def _swapped(self, probes: Sequence[nn.Module]) -> Iterator[None]:
        originals = list(self.layers)
        try:
            for i, probe in enumerate(probes):
                self.layers[i] = probe
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        cache: object,
        attention_mask: torch.Tensor | None = None,
        pre_hook: LayerHook | None = None,
        post_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run the decoder stack with temporary per-layer hooks.

        Args:
            inputs_embeds: ``[b, n, d]`` token embeddings.
            cache: a pre-filled cache (memory keys and values) or ``None``.
            attention_mask: ``[b, p + n]`` 2-D mask over cache and tokens, or ``None`` for all ones.
            pre_hook: called with ``(layer_index, layer_input)`` before each layer; may return a
                replacement input.
            post_hook: called with ``(layer_index, layer_output)`` after each layer; may return a
                replacement output.

        Returns:
            the decoder's last hidden state ``[b, n, d]`` (after its final norm).
        """
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for i, layer in enumerate(self.layers):
                if pre_hook is not None:
                    handles.append(layer.register_forward_pre_hook(_make_pre(i, pre_hook), with_kwargs=True))
                if post_hook is not None:
                    handles.append(layer.register_forward_hook(_make_post(i, post_hook)))
            out = self.decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        finally:
            for handle in handles:
                handle.remove()
        return out.last_hidden_state


@functools.cache
def _takes_layer_type(forward: Callable[..., Any]) -> bool:
    """Whether a rotary embedding's ``forward`` takes a layer type (Gemma 3's per-type tables)."""
    return "layer_type" in inspect.signature(forward).parameters


def _param_sets(rotary: nn.Module) -> list[dict[str, Any]]:
    params = getattr(getattr(rotary, "config", None), "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def _make_pre(index: int, hook: LayerHook) -> Callable[..., object]:
    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            hidden = args[0]
            new = hook(index, hidden)
            return ((new, *args[1:]), kwargs) if new is not None else None
        new = hook(index, kwargs["hidden_states"])
        if new is None:
            return None
        return args, {**kwargs, "hidden_states": new}

    return pre


def _make_post(index: int, hook: LayerHook) -> Callable[..., object]:
    def post(module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            new = hook(index, output[0])
            return (new, *output[1:]) if new is not None else None
        assert isinstance(output, torch.Tensor)
        return hook(index, output)

    return post
