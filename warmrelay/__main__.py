"""``python -m warmrelay`` = the ``warmrelay`` command."""

from warmrelay.cli import main

raise SystemExit(main())
