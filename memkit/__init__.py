"""memkit: plug-in latent memory (MemoryLLM, M+) for any HuggingFace decoder LLM.

```python
import memkit
mem = memkit.wrap(model, recipe="training-free", tokenizer=tokenizer)
mem.inject("A long document ...")
mem.generate(**tokenizer("Question: ...", return_tensors="pt"), max_new_tokens=32)
```
"""

__version__ = "0.1.0"

from memkit.config import MemkitConfig  # noqa: E402
from memkit.errors import (  # noqa: E402
    EmptyInputError,
    IncompatibleModelError,
    InputError,
    MemkitError,
    MemoryStateError,
    MissingTokenizerError,
    PluginError,
    RecipeError,
    RegistrationError,
    UnknownComponentError,
    UnwrappedError,
)
from memkit.hookspecs import hookimpl  # noqa: E402
from memkit.interfaces import Evicted, Injector, LongTermStore, MemoryPool, MemoryPrefix, Retriever, StoreEntries  # noqa: E402
from memkit.model import Injection, MemkitModel  # noqa: E402
from memkit.recipe import PartSpec, Recipe, load_recipe  # noqa: E402
from memkit.registry import Registry  # noqa: E402
from memkit.api import list_recipes, wrap  # noqa: E402

__all__ = [
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
    "Registry",
    "RegistrationError",
    "Retriever",
    "StoreEntries",
    "UnknownComponentError",
    "UnwrappedError",
    "__version__",
    "hookimpl",
    "list_recipes",
    "load_recipe",
    "wrap",
]
