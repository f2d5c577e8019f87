"""Every process the tests start imports vspan as installed: the checkout's ``vspan/`` folder
is only the core of the package (``analysis/``, ``collectors/`` and ``api/`` join it when
installed), so a ``python -c``/``-m`` started in the checkout must not put the current
directory first on its path (``PYTHONSAFEPATH``, Python 3.11+; ``./run.sh`` sets it too)."""

import os

os.environ["PYTHONSAFEPATH"] = "1"
