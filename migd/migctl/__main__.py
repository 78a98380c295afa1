"""``python -m migd.migctl`` runs the client, exactly like the ``migctl`` console script."""

from migd.migctl import main

raise SystemExit(main())
