"""Load a transformers model for serving without importing what serving never uses.

The first `from_pretrained` imports transformers' generation and loss utilities, and with them
scikit-learn (`roc_curve`, for one heuristic of assisted generation) and scipy (`scipy.optimize`,
for object-detection losses), which pull in pandas and pyarrow too: a quarter of the CPU time of
`mlops serve`'s start-up on the example (4.2 vs 5.5 s measured; `python -X importtime`). The
engines use neither. So while the first load runs, those two read as not installed: transformers
asks `importlib.util.find_spec`, which answers None for a name `sys.modules` maps to None, keeps
that answer (cached), and skips what needs them. Afterwards both import as usual for anyone else
(the monitor's drift statistics use scipy). Nothing is hidden once transformers' model code is
loaded (training ran first in this process, say): hiding would then save nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

UNUSED = ("sklearn", "scipy")
_LOCK = threading.Lock()


@contextlib.contextmanager
def serving_imports() -> Iterator[None]:
    """Hold around the first import of transformers and the first `from_pretrained`."""
    with _LOCK:
        hide = "transformers.modeling_utils" not in sys.modules and not any(m in sys.modules for m in UNUSED)
        if hide:
            for name in UNUSED:
                sys.modules[name] = None  # type: ignore[assignment]
        try:
            yield
        finally:
            if hide:
                for name in UNUSED:
                    if sys.modules.get(name, ...) is None:
                        del sys.modules[name]
