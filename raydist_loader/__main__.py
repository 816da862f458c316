from raydist_loader.cli import main

raise SystemExit(main())
