"""The first code each worker of ``codes.pool`` runs, as a file (``runpy.run_path``).

The package's ``__init__`` imports torch and transformers, which no worker needs: the package
is registered bare (its folder, without running ``__init__``) before anything of it is
imported, then ``pool.start_worker`` runs with the pool's ``SETTINGS``. Imported as a module,
this file does nothing.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec
from pathlib import Path

if __name__ == "__pool_worker__":  # pool.BOOT_NAME
    if "codebook_lens" not in sys.modules:
        spec = ModuleSpec("codebook_lens", None, is_package=True)
        spec.submodule_search_locations = [str(Path(__file__).resolve().parents[1])]
        sys.modules["codebook_lens"] = module_from_spec(spec)

    from codebook_lens.codes.pool import start_worker

    start_worker(**globals()["SETTINGS"])
