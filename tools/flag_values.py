"""Options whose value is more flags (`--train-args '--amp --channels-last'`), as the tools take them.

argparse reads a lone value that starts with '-' (`--train-args --no-amp`) as an option of its own
and stops: "expected one argument", so a value of one flag needed the `=` form. `joined` writes
such a pair in that form before the parse, so both spellings work. `flags_among`: which of
those flags a tool sets itself for each run. `flag_words`: their argparse type.
"""
import argparse
import shlex


def joined(argv, options):
    """`argv` (a list of str) with each of `options` and the word after it made one `OPTION=VALUE` word."""
    out, words = [], iter(argv)
    for word in words:
        value = next(words, None) if word in options else None
        out.append(word if value is None else f"{word}={value}")
    return out


def flag_words(text):
    """An argparse type: a value of more flags (`--train-args`), as given, once shlex splits it as a shell would.
    An unclosed quote (`--train-args "--amp '"`) was shlex's 'ValueError: No closing quotation' traceback: out of
    the parse (reproduce.py, speedrun.py), or out of gpu_session.py's part, after the parts before it."""
    try:
        shlex.split(text)
    except ValueError as e:  # 'No closing quotation', 'No escaped character' (a trailing backslash)
        raise argparse.ArgumentTypeError(f"{str(e)[:1].lower()}{str(e)[1:]} in {text!r}") from None
    return text


def flags_among(train_args, dests):
    """The train.py flags that `train_args` (one string, as --train-args takes it) names among `dests`
    (argparse's names: "output_dir"), as typed ("--output-dir"), sorted; none where train.py refuses
    `train_args` (its own check of each run's flags says why, naming the run). A tool's --train-args
    come last and would win over the flags it sets for each run."""
    import train  # torch and the models: the runs' own imports, once
    from pipeline.errors import TinyinError

    try:
        given = train.given_flags(shlex.split(train_args or ""))
    except TinyinError:
        return []
    return ["--" + dest.replace("_", "-") for dest in sorted(given & set(dests))]
