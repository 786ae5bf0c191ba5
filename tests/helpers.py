"""Test helpers: an independent reference for reading memory."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from memkit.backbone import Backbone


def concat_reference_logits(model: PreTrainedModel, memory: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``input_ids`` ``[1, n]`` when ``memory[i]`` ``[p, d]`` is concatenated before layer i's input.

    Runs the model's ordinary forward over ``p + n`` positions; a pre-hook on every decoder layer
    overwrites the first ``p`` positions of its input with that layer's memory. Causal attention lets
    every token see all memory; the memory rows' outputs are discarded. This is the definition that
    memkit's cache-based read path must match.
    """
    layers = Backbone(model).layers
    p = memory.shape[1]
    embeds = model.get_input_embeddings()(input_ids)
    full = torch.cat([embeds.new_zeros(1, p, embeds.shape[-1]), embeds], dim=1)
    handles = []

    def make(i: int):
        def pre(module, args, kwargs):
            hidden = torch.cat([memory[i].unsqueeze(0).to(args[0].dtype), args[0][:, p:]], dim=1)
            return (hidden, *args[1:]), kwargs

        return pre

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make(i), with_kwargs=True))
        return model(inputs_embeds=full).logits[:, p:]
    finally:
        for h in handles:
            h.remove()
