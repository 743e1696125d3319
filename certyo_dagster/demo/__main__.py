from certyo_dagster.demo.cli import main

raise SystemExit(main())
