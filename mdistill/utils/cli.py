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


def split_trailing_options(opts, with_value=()):
    """Pull ``--options`` written after ``KEY VALUE`` overrides out of them.

    argparse's REMAINDER keeps everything after the first override, so in
    ``--cfg X SOLVER.LR 0.1 --resume`` it would take ``--resume`` for a key. A
    token starting with ``--`` where a key belongs is an option instead (config
    keys never start with a dash); those named in ``with_value`` take the next
    token as their value.

    Returns:
        ``(overrides, options)``, both lists of tokens in their order.
    """
    overrides, options, index = [], [], 0
    while index < len(opts):
        token = opts[index]
        if token.startswith("--") and len(overrides) % 2 == 0:
            options.append(token)
            if token in with_value and index + 1 < len(opts):
                index += 1
                options.append(opts[index])
        else:
            overrides.append(token)
        index += 1
    return overrides, options
