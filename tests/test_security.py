"""Security: files load without running code, and third-party plugins load only as the environment allows."""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import memkit
from memkit import plugins
from memkit.builtin.pool import RandomDropPool
from memkit.testing import tiny_model

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL_FIXTURE = ROOT / "tests" / "fixtures" / "official-memoryllm-tiny" / "checkpoint"


class _Payload:
    """An object whose unpickling runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def torch_payload(tmp_path: Path, marker: Path) -> Path:
    """A ``torch.save`` file that runs code when fully unpickled; the test proves it is armed."""
    path = tmp_path / "payload.pt"
    torch.save(_Payload(marker), path)
    torch.load(path, weights_only=False)  # armed: an unrestricted load runs the code
    assert marker.exists()
    marker.unlink()
    return path


@pytest.fixture
def raw_payload(tmp_path: Path, marker: Path) -> Path:
    """A plain pickle file that runs code when unpickled; the test proves it is armed."""
    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    return path


# ---------------------------------------------------------------------------------------------------
# nothing that memkit loads is unpickled
# ---------------------------------------------------------------------------------------------------


def _mem() -> memkit.MemkitModel:
    return memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_a_pickle_given_as_a_memory_file_is_refused_without_running_code(
    request: pytest.FixtureRequest, marker: Path, kind: str
) -> None:
    payload: Path = request.getfixturevalue(f"{kind}_payload")
    with pytest.raises(memkit.MemoryStateError, match=re.escape(str(payload))):
        _mem().load_memory(payload)
    assert not marker.exists()


SMALL_MPLUS = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 200, "merge_every": 3},
    "retriever": {"key_size": 8},
}
FAST: dict[str, Any] = {
    "min_chunk_tokens": 8,
    "max_chunk_tokens": 24,
    "min_target_tokens": 8,
    "max_target_tokens": 32,
    "max_contexts": 4,
    "learning_rate": 1e-3,
    "log_every": 5,
}


@pytest.mark.parametrize("file", ["optimizer.pt", "torch_rng.pt"])
def test_a_training_checkpoint_holding_a_pickle_payload_is_refused_without_running_code(
    tmp_path: Path, torch_payload: Path, marker: Path, file: str
) -> None:
    from memkit.training import Trainer

    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 120, (80,), generator=gen) for _ in range(6)]
    mem = memkit.wrap(tiny_model("llama"), "mplus", **SMALL_MPLUS)
    Trainer(mem, docs, stage="stage3", steps=1, output_dir=tmp_path / "run", progress=False, **FAST).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / file).is_file()
    shutil.copy(torch_payload, checkpoint / file)

    resumed = memkit.wrap(tiny_model("llama"), "mplus", **SMALL_MPLUS)
    trainer = Trainer(resumed, docs, stage="stage3", steps=2, resume_from=checkpoint, progress=False, **FAST)
    with pytest.raises(memkit.TrainingError, match=re.escape(str(checkpoint / file))):
        trainer.train()
    assert not marker.exists()


def test_memkit_weights_replaced_by_a_pickle_are_refused_without_running_code(
    tmp_path: Path, torch_payload: Path, marker: Path
) -> None:
    mem = _mem()
    mem.save_pretrained(tmp_path / "ckpt")
    shutil.copy(torch_payload, tmp_path / "ckpt" / "memkit_weights.safetensors")
    with pytest.raises(memkit.CheckpointError, match="memkit_weights.safetensors"):
        memkit.from_pretrained(tmp_path / "ckpt", model=tiny_model("llama"))
    assert not marker.exists()


def test_a_saved_base_model_is_read_from_safetensors_only_never_from_a_pickled_bin(
    tmp_path: Path, torch_payload: Path, marker: Path
) -> None:
    mem = _mem()
    mem.save_pretrained(tmp_path / "ckpt", save_base_model=True)
    base = tmp_path / "ckpt" / "base_model"
    weights = sorted(base.glob("*.safetensors"))
    assert weights, "the base model is saved as safetensors"
    for path in weights:
        path.unlink()
    shutil.copy(torch_payload, base / "pytorch_model.bin")
    with pytest.raises(memkit.CheckpointError, match="base model"):
        memkit.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()


def test_an_official_checkpoint_with_a_pickled_bin_is_refused_without_running_code(
    tmp_path: Path, torch_payload: Path, marker: Path
) -> None:
    folder = tmp_path / "official"
    folder.mkdir()
    shutil.copy(OFFICIAL_FIXTURE / "config.json", folder / "config.json")
    shutil.copy(torch_payload, folder / "pytorch_model.bin")
    with pytest.raises(memkit.CheckpointError, match="safetensors only"):
        memkit.from_pretrained(folder)
    assert not marker.exists()


def test_a_recipe_file_holding_a_text_pickle_is_refused_without_running_code(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "evil.toml"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=0))  # protocol 0 is ASCII: it reaches the TOML parser
    with pytest.raises(memkit.RecipeError, match="not valid TOML"):
        memkit.load_recipe(path)
    assert not marker.exists()


def test_memkit_source_never_unpickles_without_weights_only() -> None:
    """Every torch.load in memkit passes weights_only=True, and nothing calls pickle's loaders."""
    offenders = []
    for path in sorted((ROOT / "memkit").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\((?P<args>[^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if "weights_only=True" not in match.group("args"):
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        for match in re.finditer(r"\b(?:pickle|cPickle|dill|joblib)\.loads?\(|import (?:dill|joblib)\b", text):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------------------
# third-party plugins: installed entry points only, filtered by MEMKIT_PLUGINS_ALLOW / _BLOCK
# ---------------------------------------------------------------------------------------------------

PLUGIN_SOURCE = """
    import memkit
    from memkit.builtin.pool import RandomDropPool


    class Pool(RandomDropPool):
        name = "{pool}"


    @memkit.hookimpl
    def register_pools(registry):
        registry.add_pool(Pool)
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """``install(entry_point)`` -> module: a fake installed distribution whose plugin registers the pool
    ``<entry_point>-pool``. Autoload is switched on and the allow and block lists cleared."""
    written: list[str] = []

    def install(entry_point: str) -> str:
        module = f"memkit_security_{entry_point}"
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(
            textwrap.dedent(PLUGIN_SOURCE.format(pool=f"{entry_point.replace('_', '-')}-pool"))
        )
        dist_info = tmp_path / f"{module}-0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (dist_info / "entry_points.txt").write_text(f"[memkit]\n{entry_point} = {module}\n")
        written.append(module)
        return module

    monkeypatch.syspath_prepend(str(tmp_path))
    for variable in (plugins.DISABLE_AUTOLOAD_ENV, plugins.ALLOW_ENV, plugins.BLOCK_ENV):
        monkeypatch.delenv(variable, raising=False)
    plugins.reset()
    try:
        yield install
    finally:
        plugins.reset()
        for module in written:
            sys.modules.pop(module, None)


def _loaded() -> set[str]:
    """Names of the fake plugins' pools in a freshly built registry."""
    plugins.reset()
    return {name for name in plugins.get_registry().names("pool") if name.endswith("-pool")}


def test_without_a_list_every_installed_entry_point_is_loaded(installed: Callable[[str], str]) -> None:
    installed("sec_one")
    installed("sec_two")
    assert _loaded() == {"sec-one-pool", "sec-two-pool"}


def test_the_allow_list_loads_only_the_plugins_it_names_and_imports_no_other(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("sec_one")
    other = installed("sec_two")
    monkeypatch.setenv(plugins.ALLOW_ENV, " sec_one , ")
    assert _loaded() == {"sec-one-pool"}
    assert other not in sys.modules, "a plugin left out must not even be imported"
    assert plugins.get_registry().get("pool", "random_drop") is RandomDropPool  # built-ins are not affected


def test_the_block_list_loads_every_plugin_but_those_it_names(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = installed("sec_one")
    installed("sec_two")
    monkeypatch.setenv(plugins.BLOCK_ENV, "sec_one")
    assert _loaded() == {"sec-two-pool"}
    assert blocked not in sys.modules


def test_a_broken_plugin_can_be_skipped_with_the_block_list(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = installed("sec_broken")
    installed("sec_two")
    (tmp_path / broken / "__init__.py").write_text("raise RuntimeError('broken at import')\n")
    with pytest.raises(memkit.PluginError, match=f"{plugins.BLOCK_ENV}=sec_broken"):
        _loaded()
    monkeypatch.setenv(plugins.BLOCK_ENV, "sec_broken")
    assert _loaded() == {"sec-two-pool"}


def test_an_allow_list_of_separators_only_loads_no_plugin(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("sec_one")
    monkeypatch.setenv(plugins.ALLOW_ENV, ",")
    assert _loaded() == set()
    monkeypatch.setenv(plugins.ALLOW_ENV, "  ")  # blank: as if unset
    assert _loaded() == {"sec-one-pool"}


def test_setting_both_the_allow_and_the_block_list_is_an_error_that_says_so(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("sec_one")
    monkeypatch.setenv(plugins.ALLOW_ENV, "sec_one")
    monkeypatch.setenv(plugins.BLOCK_ENV, "sec_two")
    with pytest.raises(memkit.PluginError) as info:
        _loaded()
    message = str(info.value)
    assert plugins.ALLOW_ENV in message and plugins.BLOCK_ENV in message and "set only one" in message


def test_an_allowed_name_that_nothing_provides_is_warned_about(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    installed("sec_one")
    monkeypatch.setenv(plugins.ALLOW_ENV, "sec_one,sec_typo")
    with caplog.at_level(logging.WARNING, logger="memkit.plugins"):
        assert _loaded() == {"sec-one-pool"}
    assert "sec_typo" in caplog.text and plugins.ALLOW_ENV in caplog.text


def test_disabling_autoload_loads_no_plugin_whatever_the_lists_say(
    installed: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("sec_one")
    monkeypatch.setenv(plugins.ALLOW_ENV, "sec_one")
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    assert _loaded() == set()


def test_a_plugin_module_on_the_path_without_an_installed_entry_point_is_not_loaded(
    installed: Callable[[str], str], tmp_path: Path
) -> None:
    module = installed("sec_one")
    shutil.rmtree(tmp_path / f"{module}-0.1.dist-info")  # the code is importable, but nothing declares it
    assert _loaded() == set()
    assert module not in sys.modules
