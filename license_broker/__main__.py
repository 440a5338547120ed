from license_broker.cli import main

raise SystemExit(main())
