"""Loaded at start-up by every Python process that has tools/poison_site on PYTHONPATH (the
chaos harness puts it there only for runs with the `liar` fault): installs tools/poison.py's
hook in torchrun's worker processes. A test harness, never production code."""

import os

if os.environ.get("DILO_POISON_FILE") and "RANK" in os.environ:
    from tools.poison import install_from_env

    install_from_env()
