"""python -m selfreplay.cli: the command line."""

from selfreplay.cli import main

raise SystemExit(main())
