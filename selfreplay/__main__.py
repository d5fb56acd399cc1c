"""python -m selfreplay: the command line."""

from selfreplay.cli import main

raise SystemExit(main())
