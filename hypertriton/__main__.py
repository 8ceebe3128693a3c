from hypertriton.cli import main

raise SystemExit(main())
