"""``python -m service`` is the same as the ``loraplex`` command."""

from service.cli import main

raise SystemExit(main())
