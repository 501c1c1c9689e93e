"""`python -m server.cli`: the same as the `scdd` command."""

from server.cli import main

raise SystemExit(main())
