"""Errors that reach the user as one line instead of a traceback."""
import difflib


class UserError(Exception):
    """A mistake in the user's input: a config key, a name, a path.

    The command-line tools print ``str(error)`` on one line and exit with
    status 2, without a traceback (unless ``--debug`` is given).
    """


def closest_first(name, choices, limit=None):
    """Return ``choices`` ordered so the ones closest to ``name`` come first.

    Args:
        name: the value the user gave.
        choices: the valid values.
        limit: keep at most this many (all when None).

    Returns:
        A list of strings.
    """
    choices = [str(choice) for choice in choices]
    if not choices:
        return []
    close = difflib.get_close_matches(str(name), choices, n=len(choices), cutoff=0.0)
    ordered = close + [choice for choice in sorted(choices) if choice not in close]
    return ordered if limit is None else ordered[:limit]


def unknown_choice(kind, name, choices):
    """Build the UserError for a name that is not one of ``choices``.

    The message suggests the closest valid name when one is close, then lists
    every valid name in sorted order (so a user can scan for the one meant).
    """
    valid = sorted(str(choice) for choice in choices)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return UserError(f"unknown {kind} {name!r}; {hint}valid: "
                     f"{', '.join(valid) or '(none registered)'}")
