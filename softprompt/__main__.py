import sys

from softprompt.cli import main

sys.exit(main())
