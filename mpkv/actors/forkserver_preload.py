"""Imported once, by the launcher's forkserver process only (``set_forkserver_preload``).

The kernel's parent-death signal is tied to a process's parent: the actors' parent is the forkserver, and the
forkserver's parent is the launcher. So the forkserver asks for SIGKILL when the launcher dies (even by
kill -9), and each actor asks for SIGKILL when the forkserver dies (``entry.die_with_parent``): a dead launcher
takes the whole instance with it, and `mpkv cleanup` or the next launch reclaims its names.
"""

from mpkv.actors.entry import die_with_parent
from mpkv.actors.runtime import Actor  # noqa: F401 - preloads torch and the actors' code once, before any fork

die_with_parent()
