"""``python -m migd`` runs the daemon, exactly like the ``migd`` console script."""

from migd.cli import main

raise SystemExit(main())
