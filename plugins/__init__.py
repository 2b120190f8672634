"""Built-in `dis` plugins (installed as the import package ``dis_plugins``).

Each module is one subcommand, declared in ``pyproject.toml`` under the ``dis.commands``
entry-point group, the same way a third-party package adds its own.
"""
