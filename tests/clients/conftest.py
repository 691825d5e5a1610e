"""tests/clients/ runs in the Python 3.12 venv of .ci/gemma_venv.sh (tests/test_clients_gemma.py
drives it); the main venv, which has no gemma, does not collect it."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("gemma") else ["*_test.py"]
