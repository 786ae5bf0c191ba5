"""The built-in :class:`~memkit.interfaces.MemoryPool`: a fixed pool with random-drop or FIFO eviction."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from memkit.config import MemkitConfig
from memkit.errors import InputError, MemoryStateError
from memkit.hookspecs import hookimpl
from memkit.interfaces.pool import Evicted, MemoryPool
from memkit.registry import Registry

__all__ = ["RandomDropPool"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RandomDropPool(MemoryPool):
    """Per memory layer, ``N`` latent vectors; each write appends up to ``K`` and evicts the excess.

    Eviction is a setting (``eviction``):

    * ``"random"``: MemoryLLM's rule: the vectors to drop are chosen uniformly at random; the kept
      ones are the first ``s - e`` entries of one ``torch.randperm(s)``, sorted, so survivors keep their
      order. With ``per_layer`` each layer draws its own permutation (layer 0 first), otherwise one
      permutation serves all layers. With ``seed`` unset, draws come from torch's global generator
      (as the official code does), so ``torch.manual_seed`` makes them repeatable.
    * ``"fifo"``: the oldest vectors go first; memory then equals the most recent ``N`` written vectors.

    Initial state (``init``): ``"empty"`` (the pool grows until full) or ``"tile"`` (MemoryLLM's
    uninitialised memory: the first write is repeated to fill all ``N`` slots, evicting nothing).

    Shapes: ``l`` memory layers, ``s`` vectors held (``<= N``), ``d`` hidden size.
    """

    name = "random_drop"

    class Config(MemkitConfig):
        capacity: int = Field(description="N: vectors held per memory layer", gt=0)
        write_size: int = Field(description="K: vectors written per layer by one update", gt=0)
        eviction: Literal["random", "fifo"] = Field(
            "random",
            description="which vectors a full pool drops: uniformly random (MemoryLLM) or oldest first",
        )
        per_layer: bool = Field(True, description="draw the random drop independently for each layer")
        init: Literal["empty", "tile"] = Field(
            "empty", description="start empty, or fill all N slots by tiling the first write (MemoryLLM)"
        )
        seed: int | None = Field(
            None, description="seed of the pool's own generator; None draws from torch's global generator"
        )
        dtype: Literal["model", "float32", "float16", "bfloat16"] = Field(
            "model", description="storage dtype of the vectors; 'model' uses the model's dtype"
        )
        age_short_term: bool = Field(
            True,
            description="add k to the age of every vector already held at each write of k vectors; False keeps "
            "held ages as written, reproducing the official M+ inference code, whose short-term ages never "
            "advance (memkit.from_pretrained(..., fidelity='official') sets it)",
        )

        @model_validator(mode="after")
        def _k_fits(self) -> RandomDropPool.Config:
            if self.write_size > self.capacity:
                raise ValueError(
                    f"write_size K={self.write_size} is larger than capacity N={self.capacity}; K must be <= N"
                )
            return self

    config: Config

    def __init__(
        self, config: Config, *, num_layers: int, hidden_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        store_dtype = dtype if config.dtype == "model" else _DTYPES[config.dtype]
        super().__init__(config, num_layers=num_layers, hidden_size=hidden_size, device=device, dtype=store_dtype)
        self._generator: torch.Generator | None = None
        self._version = 0
        self.reset()

    # -- state --------------------------------------------------------------------------------------

    def reset(self) -> None:
        lyr, d = self.num_layers, self.hidden_size
        self._vectors = torch.zeros(lyr, 0, d, dtype=self.dtype, device=self.device)
        self._ages = torch.zeros(lyr, 0, dtype=torch.long, device=self.device)
        self._sources = torch.zeros(lyr, 0, dtype=torch.long, device=self.device)
        if self.config.seed is not None:
            self._generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        self._version += 1

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def write_size(self) -> int:
        return self.config.write_size

    @property
    def size(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def version(self) -> int:
        return self._version

    def read(self) -> torch.Tensor:
        return self._vectors

    def ages(self) -> torch.Tensor:
        return self._ages

    def sources(self) -> torch.Tensor:
        return self._sources

    # -- update -------------------------------------------------------------------------------------

    def write(self, vectors: torch.Tensor, source: int) -> Evicted:
        lyr, d = self.num_layers, self.hidden_size
        if not isinstance(vectors, torch.Tensor):
            raise InputError(f"a pool write takes a tensor of vectors, got {type(vectors).__name__}")
        if vectors.dim() != 3 or vectors.shape[0] != lyr or vectors.shape[2] != d:
            raise InputError(f"a pool write takes [layers={lyr}, k, d={d}] vectors, got {list(vectors.shape)}")
        k = int(vectors.shape[1])
        if not 1 <= k <= self.write_size:
            raise InputError(f"a pool write adds 1 to K={self.write_size} vectors per layer, got {k}")
        if not torch.isfinite(vectors).all():
            raise InputError("refusing to write NaN or infinite vectors into memory; the pool is unchanged")
        vectors = vectors.detach().to(device=self.device, dtype=self.dtype)
        new_ages = torch.arange(k - 1, -1, -1, device=self.device).expand(lyr, k)
        new_sources = torch.full((lyr, k), int(source), dtype=torch.long, device=self.device)
        old_ages = self._ages + k if self.config.age_short_term else self._ages

        if self.size == 0 and self.config.init == "tile":
            reps = -(-self.capacity // k)
            n = self.capacity
            self._set(
                vectors.repeat(1, reps, 1)[:, -n:],
                new_ages.repeat(1, reps)[:, -n:],
                new_sources.repeat(1, reps)[:, -n:],
            )
            return self._empty_evicted()

        excess = max(self.size + k - self.capacity, 0)
        if excess == 0 or self.config.eviction == "fifo":
            # The oldest slots go: slicing copies the pool once (the cat), where gathering would copy it twice.
            evicted = Evicted(
                vectors=self._vectors[:, :excess].clone(),
                ages=old_ages[:, :excess].clone(),
                sources=self._sources[:, :excess].clone(),
            )
            self._set(
                torch.cat([self._vectors[:, excess:], vectors], 1),
                torch.cat([old_ages[:, excess:], new_ages], 1),
                torch.cat([self._sources[:, excess:], new_sources], 1),
            )
            return evicted
        keep, drop = self._choose(excess)
        evicted = Evicted(
            vectors=torch.gather(self._vectors, 1, drop.unsqueeze(-1).expand(-1, -1, d)),
            ages=torch.gather(old_ages, 1, drop),
            sources=torch.gather(self._sources, 1, drop),
        )
        self._set(
            torch.cat([torch.gather(self._vectors, 1, keep.unsqueeze(-1).expand(-1, -1, d)), vectors], 1),
            torch.cat([torch.gather(old_ages, 1, keep), new_ages], 1),
            torch.cat([torch.gather(self._sources, 1, keep), new_sources], 1),
        )
        return evicted

    def _choose(self, excess: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random eviction of ``excess >= 1`` slots: kept and dropped slot indices, each ``[l, *]`` ascending."""
        lyr, s = self.num_layers, self.size
        draws = lyr if self.config.per_layer else 1
        perms = [torch.randperm(s, generator=self._generator) for _ in range(draws)]
        perm = torch.stack(perms).to(self.device).expand(lyr, s)
        keep = perm[:, : s - excess].sort(dim=1).values
        drop = perm[:, s - excess :].sort(dim=1).values
        return keep, drop

    def _set(self, vectors: torch.Tensor, ages: torch.Tensor, sources: torch.Tensor) -> None:
        self._vectors, self._ages, self._sources = (
            vectors.contiguous(),
            ages.contiguous(),
            sources.contiguous(),
        )
        self._version += 1

    def _empty_evicted(self) -> Evicted:
        lyr, d = self.num_layers, self.hidden_size
        return Evicted(
            vectors=torch.zeros(lyr, 0, d, dtype=self.dtype, device=self.device),
            ages=torch.zeros(lyr, 0, dtype=torch.long, device=self.device),
            sources=torch.zeros(lyr, 0, dtype=torch.long, device=self.device),
        )

    # -- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"vectors": self._vectors, "ages": self._ages, "sources": self._sources}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        lyr, d = self.num_layers, self.hidden_size
        try:
            vectors, ages, sources = state["vectors"], state["ages"], state["sources"]
        except KeyError as exc:
            raise MemoryStateError(f"pool state lacks {exc.args[0]!r}; it was not written by {self.name!r}") from None
        s = vectors.shape[1] if vectors.dim() == 3 else -1
        if vectors.dim() != 3 or vectors.shape[0] != lyr or vectors.shape[2] != d or not 0 <= s <= self.capacity:
            raise MemoryStateError(
                f"pool state holds vectors of shape {list(vectors.shape)}, but this pool holds at most "
                f"[{lyr}, {self.capacity}, {d}]; the state was made for another model or recipe"
            )
        if tuple(ages.shape) != (lyr, s) or tuple(sources.shape) != (lyr, s):
            raise MemoryStateError(
                f"pool state has ages {list(ages.shape)} and sources {list(sources.shape)}, expected [{lyr}, {s}]"
            )
        if not torch.isfinite(vectors.float()).all():
            raise MemoryStateError("pool state holds NaN or infinite vectors; refusing to load it")
        generator_state = state.get("generator")
        if generator_state is not None and self._generator is not None:
            probe = torch.Generator(device="cpu")
            try:
                probe.set_state(generator_state.to(torch.uint8).cpu())
            except (RuntimeError, TypeError, ValueError) as exc:
                raise MemoryStateError(f"pool state has an unreadable random generator state ({exc})") from None
        self._set(
            vectors.to(device=self.device, dtype=self.dtype).clone(),
            ages.to(device=self.device, dtype=torch.long).clone(),
            sources.to(device=self.device, dtype=torch.long).clone(),
        )
        if generator_state is not None and self._generator is not None:
            self._generator.set_state(generator_state.to(torch.uint8).cpu())


@hookimpl
def register_pools(registry: Registry) -> None:
    registry.add_pool(RandomDropPool)
