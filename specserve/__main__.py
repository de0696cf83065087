from specserve.cli.main import main

raise SystemExit(main())
