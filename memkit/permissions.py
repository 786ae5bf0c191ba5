"""The permissions a newly created file or folder gets by default (``0o666`` / ``0o777`` less the umask).

memkit writes files atomically: into a :func:`tempfile.mkstemp` file (or :func:`tempfile.mkdtemp`
folder) that is renamed over the target. Those are created private (``0o600`` / ``0o700``); memory
files, pretrained folders and reports are ordinary user files, so they are given the mode that
``open(path, "w")`` or ``mkdir`` would have given them.
"""

from __future__ import annotations

import os

__all__ = ["default_dir_mode", "default_file_mode", "umask"]


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's
    ``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666`` less the umask: what a plain ``open(path, "w")`` creates."""
    return 0o666 & ~umask()


def default_dir_mode() -> int:
    """``0o777`` less the umask: what a plain ``mkdir`` creates."""
    return 0o777 & ~umask()
