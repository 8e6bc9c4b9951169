"""``python -m lumireg`` is the ``lumireg`` command."""

from lumireg.cli import main

raise SystemExit(main())
