"""``python -m fusionlens.cli`` (used by ``torchrun ... -m fusionlens.cli train``)."""

from fusionlens.cli import main

raise SystemExit(main())
