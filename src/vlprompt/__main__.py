import sys

from vlprompt.cli.main import main

sys.exit(main())
