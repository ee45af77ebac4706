import sys

from slimserve.cli import main

if __name__ == "__main__":  # vLLM's engine processes are spawned: they import this module without running it
    sys.exit(main())
