"""LoRA adapters for memory recipes, through peft, removable on ``unwrap``.

MemoryLLM and M+ train two LoRA adapters on the frozen backbone: one active while memory is written
(injection), one while it is read (generation). A recipe's ``[adapters]`` section names them; memkit
adds them with peft's ``inject_adapter_in_model`` (peft replaces each targeted linear layer by a LoRA
layer that keeps the original as ``base_layer``) and switches between them around each memkit call.
:meth:`Adapters.remove` puts every original layer back, so ``unwrap`` returns the model as it was.

New adapters start as the identity (peft initialises ``lora_B`` to zero), so wrapping alone changes
no output.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import Field, field_validator
from torch import nn

from memkit.config import MemkitConfig
from memkit.errors import IncompatibleModelError, RecipeError

__all__ = ["AdapterSpec", "Adapters"]


class AdapterSpec(MemkitConfig):
    """The ``[adapters]`` section of a recipe: LoRA adapters for writing and reading memory."""

    rank: int = Field(16, gt=0, description="LoRA rank r (M+: 16)")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r (M+: 32)")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout during training (M+: 0.1)")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        description="names of the linear layers that get LoRA (M+: q/k/v/gate/up/down, not o_proj)",
    )
    names: list[str] = Field(
        default_factory=lambda: ["write", "read"],
        description="one name: a single adapter for writing and reading; two: the write adapter, then the read adapter",
    )

    @field_validator("names")
    @classmethod
    def _one_or_two(cls, value: list[str]) -> list[str]:
        if len(value) not in (1, 2) or len(set(value)) != len(value) or not all(value):
            raise ValueError(f"names must be one or two distinct adapter names, got {value}")
        return value

    @property
    def write(self) -> str:
        """The adapter active while memory is written."""
        return self.names[0]

    @property
    def read(self) -> str:
        """The adapter active while memory is read."""
        return self.names[-1]


class Adapters:
    """The LoRA adapters a recipe added to a model, with switching and removal.

    Args:
        model: the model to add them to (its targeted linear layers are replaced in place).
        spec: the recipe's adapter section.
    """

    def __init__(self, model: nn.Module, spec: AdapterSpec) -> None:
        self.spec = spec
        self.model = model
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise IncompatibleModelError(
                "the model already has peft adapters; memkit adds its own recipe adapters, so pass the base "
                "model (e.g. peft_model.unload()) or use a recipe without [adapters]"
            )
        # peft marks everything but the adapters as frozen; remember the flags to give them back.
        self._had_peft_config = hasattr(model, "peft_config")
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
            lora_dropout=spec.dropout,
            target_modules=list(spec.targets),
        )
        try:
            with warnings.catch_warnings():  # peft warns when a second adapter joins the first; that is the plan
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                for name in spec.names:
                    inject_adapter_in_model(config, model, adapter_name=name)
        except ValueError as exc:
            self.remove()
            raise RecipeError(f"cannot add the recipe's LoRA adapters to targets {spec.targets}: {exc}") from exc
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:  # every adapter on its base layer's device (peft skips some, e.g. meta)
            base = layer.get_base_layer()
            device = next(base.parameters()).device
            for attr in layer.adapter_layer_names:
                getattr(layer, attr).to(device)
        self.active = spec.read
        self._set(self.active)
        for parameter in self.parameters():  # adapters start frozen; a trainer unfreezes them
            parameter.requires_grad_(False)

    def _set(self, name: str) -> None:
        # peft's set_adapter also flips requires_grad; switching must not, so the flags are kept.
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for layer in self.layers:
            layer.set_adapter(name, inference_mode=True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        self.active = name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Make adapter ``name`` active for the block, then restore the previous one."""
        previous = self.active
        if name == previous:
            yield
            return
        self._set(name)
        try:
            yield
        finally:
            self._set(previous)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Switch every adapter off for the block (the model computes with its own weights), then back on."""
        flags = [(p, p.requires_grad) for p in self.parameters()]
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            self._set(self.active)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)

    def parameters(self) -> list[nn.Parameter]:
        """The adapters' own parameters (LoRA A and B matrices of every adapter)."""
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def remove(self) -> None:
        """Put every original linear layer back in place of its LoRA layer."""
        for parent in list(self.model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(parent, child_name, child.get_base_layer())
        for name, parameter in self.model.named_parameters():
            if name in self._requires_grad:
                parameter.requires_grad_(self._requires_grad[name])
        if not self._had_peft_config and "peft_config" in vars(self.model):
            delattr(self.model, "peft_config")
        self.layers = []
