from reccc.cli import main
import sys

sys.exit(main())
