from ca_server.cli import main

raise SystemExit(main())
