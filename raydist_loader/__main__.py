"""Layer 5 (entry points): ``python -m raydist_loader`` is the ``raydist-loader`` CLI."""

from raydist_loader.cli import main

raise SystemExit(main())
