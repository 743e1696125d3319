from certyo_demo.cli import main

raise SystemExit(main())
