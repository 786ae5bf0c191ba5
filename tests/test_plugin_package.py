"""The example plugin distribution ``plugins/memkit-cosine``, installed for real with pip.

pip builds the package from a copy of its folder (a setuptools build writes ``build/`` and
``*.egg-info`` beside the sources) and installs it into a temporary folder, which the tests put at the
front of ``sys.path``; memkit then finds the plugin through its ``memkit`` entry point, as it would
in a user's environment. Every test leaves the registry, ``sys.path`` and ``sys.modules`` as it found
them.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import memkit
from memkit import plugins
from memkit.backbone import Backbone
from memkit.testing import tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "memkit-cosine"
MODULE = "memkit_cosine"

SMALL = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 200, "merge_every": 3},
}


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding memkit-cosine as pip installs it (module, dist-info, entry points)."""
    root = tmp_path_factory.mktemp("memkit-cosine")
    source = root / "src"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
        "--no-deps", "--no-build-isolation", "--target", str(target), str(source),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (target / f"{MODULE}.py").is_file()
    return target


@pytest.fixture
def installed(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """memkit-cosine importable and autoloading enabled, with a registry rebuilt from scratch."""
    monkeypatch.syspath_prepend(str(site_dir))
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")
    plugins.reset()
    try:
        yield site_dir
    finally:
        plugins.reset()
        sys.modules.pop(MODULE, None)


def _mplus(**overrides: object) -> memkit.MemkitModel:
    options: dict[str, object] = {**SMALL, "retriever": {"name": "cosine"}, **overrides}
    return memkit.wrap(tiny_model("llama"), "mplus", **options)


def _inject(mem: memkit.MemkitModel, chunks: int = 5) -> None:
    torch.manual_seed(0)
    for _ in range(chunks):
        mem.inject(torch.randint(3, 128, (32,)))


def test_the_installed_entry_point_registers_the_cosine_retriever(installed):
    points = [ep for ep in importlib.metadata.entry_points(group="memkit") if ep.name == "cosine"]
    assert [ep.value for ep in points] == [MODULE]
    registry = plugins.get_registry()
    assert "cosine" in registry.names("retriever")
    assert registry.registrant("retriever", "cosine") == "cosine"  # the entry-point name
    cls = registry.get("retriever", "cosine")
    assert cls.__module__ == MODULE
    assert Path(sys.modules[MODULE].__file__).parent == installed  # the pip-installed copy, not the source tree


@torch.no_grad()
def test_mplus_with_the_cosine_retriever_injects_reads_and_generates(installed):
    mem = _mplus()
    assert type(mem.retriever).__module__ == MODULE and mem.retriever.key_size == 64
    _inject(mem)
    assert mem.store.size(0) >= 8
    logits = mem(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])).logits
    assert logits.shape == (2, 4, 128) and bool(torch.isfinite(logits).all())
    out = mem.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("key_size", [16, 64])  # below and above the tiny model's width (32)
@torch.no_grad()
def test_the_retrieved_entries_are_the_top_cosine_ones_oldest_first(installed, key_size):
    mem = _mplus(retriever={"name": "cosine", "key_size": key_size}, store={**SMALL["store"], "dtype": "float32"})
    _inject(mem)
    calls = []
    select = mem.retriever.select

    def recording(layer, hidden, store, k):
        ids = select(layer, hidden, store, k)
        calls.append((layer, hidden.clone(), k, ids))
        return ids

    mem.retriever.select = recording
    mem(torch.tensor([[5, 6, 7, 8, 9]]))
    assert [c[0] for c in calls] == [0, 1]
    layer, hidden, k, ids = calls[0]
    assert k == 8 and ids.shape == (8,) and len(set(ids.tolist())) == 8

    # An independent computation in float64, from the stored vectors rather than the stored keys.
    projection = mem.retriever.projection.double()  # [d, key_size]
    small = min(projection.shape)
    gram = projection.T @ projection if key_size <= 32 else projection @ projection.T
    assert torch.allclose(gram, torch.eye(small, dtype=torch.float64), atol=1e-5)  # orthogonal
    entries = mem.store.entries(layer)
    normed = Backbone(mem.base_model).input_norm(layer, entries.vectors.float()).double()
    keys = F.normalize(normed, dim=-1) @ projection
    assert torch.allclose(entries.keys.double(), keys, atol=1e-5)
    query = F.normalize((F.normalize(hidden.double(), dim=-1) @ projection).mean(dim=0), dim=0)
    cosines = F.normalize(keys, dim=-1) @ query
    chosen = ids.tolist()
    rest = sorted(set(range(len(cosines))) - set(chosen))
    expected = torch.argsort(cosines, descending=True)[:8].tolist()
    assert sorted(chosen) == sorted(expected) or float(cosines[chosen].min()) >= float(cosines[rest].max()) - 1e-6
    ages = entries.ages[ids]
    assert bool((ages[1:] <= ages[:-1]).all())  # oldest first


def test_the_projection_is_fixed_by_the_seed(installed):
    a, b, c = (_mplus(retriever={"name": "cosine", "seed": s}).retriever.projection for s in (0, 0, 1))
    assert a.shape == (32, 64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_invalid_options_are_refused_with_the_valid_ones_listed(installed):
    with pytest.raises(memkit.RecipeError, match="key_size, seed"):
        _mplus(retriever={"name": "cosine", "key_size": 0})
    with pytest.raises(memkit.RecipeError, match="key_size, seed"):
        _mplus(retriever={"name": "cosine", "metric": "dot"})


def test_with_autoload_disabled_the_recipe_cannot_find_cosine(installed, monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset()
    with pytest.raises(memkit.UnknownComponentError, match="'cosine'"):
        _mplus()
    assert "cosine" not in plugins.get_registry().names("retriever")
