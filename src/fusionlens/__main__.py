"""``python -m fusionlens``: the command line."""

from fusionlens.cli import main

raise SystemExit(main())
