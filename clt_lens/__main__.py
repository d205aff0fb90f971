import sys

from clt_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
