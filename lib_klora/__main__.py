from lib_klora.tools.cli import main

raise SystemExit(main())
