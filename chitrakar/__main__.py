from chitrakar.cli import main

raise SystemExit(main())
