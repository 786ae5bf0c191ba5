"""Generate the API reference: one page per module of the ``memkit`` package, plus its SUMMARY.md.

Run by the ``gen-files`` plugin of mkdocs (see ``mkdocs.yml``); it writes only to mkdocs' virtual
file system, never to the source tree. Private modules (``_name``) are skipped, except
``__init__``, which becomes the package's own page. ``memkit.recipes`` is a data package (the
recipe TOML files, installed from ``recipes/``) and has no API to document.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "memkit"
SKIP = {("memkit", "recipes")}

nav = mkdocs_gen_files.Nav()

for path in sorted(PACKAGE.rglob("*.py")):
    module_path = path.relative_to(ROOT).with_suffix("")
    parts = tuple(module_path.parts)
    if any(part.startswith("_") and part != "__init__" for part in parts):
        continue
    if parts[-1] == "__init__":
        parts = parts[:-1]
        doc_path = Path(*parts, "index.md")  # a package's page is the index of its section
    else:
        doc_path = Path(*parts).with_suffix(".md")
    if any(parts[: len(skip)] == skip for skip in SKIP):
        continue
    nav[parts] = doc_path.as_posix()
    with mkdocs_gen_files.open(Path("reference", doc_path), "w") as handle:
        handle.write(f"::: {'.'.join(parts)}\n")

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as nav_file:
    nav_file.writelines(nav.build_literate_nav())
