"""``python -m hsmfsm``: the command line (hsmfsm.tools.cli)."""

from .tools.cli import main

raise SystemExit(main())
