# jupyter_server's fixtures (jp_fetch, jp_root_dir, ...) for tests/server; pytest requires plugins at the top level
pytest_plugins = ["pytest_jupyter.jupyter_server"]
