"""Command-line entry points: user mistakes become one line, not a traceback."""
import sys

from ..errors import UserError


def run_main(main, argv=None):
    """Call ``main(argv)``; print a UserError as ``error: ...`` and exit 2.

    ``--debug`` anywhere in ``argv`` shows the full traceback instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        code = main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
