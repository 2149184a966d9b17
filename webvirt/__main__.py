from webvirt.cli import main

raise SystemExit(main())
