import sys

try:
    from deltakit.cli import main
except KeyboardInterrupt:  # Ctrl-C before the CLI's own boundary exists: the same answer, no traceback
    print("Aborted!", file=sys.stderr)
    sys.exit(130)

main()
