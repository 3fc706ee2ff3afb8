from pacs_embed.cli import main

raise SystemExit(main())
