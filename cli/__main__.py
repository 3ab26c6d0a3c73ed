"""``python -m cli`` is the ``fitfleet`` command."""

from cli.main import main

main()
