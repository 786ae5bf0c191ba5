"""memkit: plug-in latent memory (MemoryLLM, M+) for any HuggingFace decoder LLM.

```python
import memkit
mem = memkit.wrap(model, recipe="training-free", tokenizer=tokenizer)
mem.inject("A long document ...")
mem.generate(**tokenizer("Question: ...", return_tensors="pt"), max_new_tokens=32)
```
"""

__version__ = "0.1.0"

from memkit.api import list_recipes, wrap
from memkit.config import MemkitConfig
from memkit.errors import (
    CheckpointError,
    DataError,
    EmptyInputError,
    IncompatibleModelError,
    InputError,
    MemkitError,
    MemoryStateError,
    MissingTokenizerError,
    PluginError,
    RecipeError,
    RegistrationError,
    TrainingError,
    UnknownComponentError,
    UnwrappedError,
)
from memkit.hookspecs import hookimpl
from memkit.interfaces import (
    Evicted,
    Injector,
    LongTermStore,
    MemoryPool,
    MemoryPrefix,
    Retriever,
    StoreEntries,
)
from memkit.model import Injection, MemkitModel
from memkit.official import from_pretrained
from memkit.recipe import PartSpec, Recipe, load_recipe
from memkit.registry import Registry
from memkit.scaling import scale_recipe

__all__ = [
    "CheckpointError",
    "DataError",
    "EmptyInputError",
    "Evicted",
    "IncompatibleModelError",
    "Injection",
    "Injector",
    "InputError",
    "LongTermStore",
    "MemkitConfig",
    "MemkitError",
    "MemkitModel",
    "MemoryPool",
    "MemoryPrefix",
    "MemoryStateError",
    "MissingTokenizerError",
    "PartSpec",
    "PluginError",
    "Recipe",
    "RecipeError",
    "RegistrationError",
    "Registry",
    "Retriever",
    "StoreEntries",
    "TrainingError",
    "UnknownComponentError",
    "UnwrappedError",
    "__version__",
    "from_pretrained",
    "hookimpl",
    "list_recipes",
    "load_recipe",
    "scale_recipe",
    "wrap",
]
