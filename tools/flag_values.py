"""Options whose value is more flags (`--train-args '--amp --channels-last'`), as the tools take them.

argparse reads a lone value that starts with '-' (`--train-args --no-amp`) as an option of its own
and stops: "expected one argument", so a value of one flag needed the `=` form. `joined` writes
such a pair in that form before the parse, so both spellings work.
"""


def joined(argv, options):
    """`argv` (a list of str) with each of `options` and the word after it made one `OPTION=VALUE` word."""
    out, words = [], iter(argv)
    for word in words:
        value = next(words, None) if word in options else None
        out.append(word if value is None else f"{word}={value}")
    return out
