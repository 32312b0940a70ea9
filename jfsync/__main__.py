"""Entry point for ``python -m jfsync``; the commands live in :mod:`jfsync.cli`."""

from jfsync.cli import main

raise SystemExit(main())
