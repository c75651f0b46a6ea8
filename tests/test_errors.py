"""`pipeline.errors`: which errors become one line and which exit code, and the file an OSError names."""
import errno
import os
import signal

import pytest

from pipeline.errors import Terminated, hide_password, naming, plural, sigterm_interrupts, stop_code, user_errors


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                  errno.ENAMETOOLONG])
def test_an_oserror_of_the_environment_is_one_line_naming_its_file(code, capsys):
    """A full disk or quota, no permission, a read-only file system, a file for a folder, a name too long:
    the machine's doing, told in one line."""
    with pytest.raises(SystemExit) as caught:
        with user_errors():
            raise OSError(code, os.strerror(code), "/data/out/manifest.json")
    assert (caught.value.code, capsys.readouterr().err) == (1, f"error: {os.strerror(code)}: /data/out/manifest.json\n")


def test_an_oserror_of_the_environment_naming_no_file_is_its_reason_alone(capsys):
    """A write's full disk that nothing named a file for: its reason, not 'No space left on device: None'."""
    with pytest.raises(SystemExit) as caught:
        with user_errors():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (caught.value.code, capsys.readouterr().err) == (1, f"error: {os.strerror(errno.ENOSPC)}\n")


def test_another_oserror_keeps_its_traceback():
    """EIO and the like may be bugs (or a failing disk): not hidden behind one line."""
    error = OSError(errno.EIO, os.strerror(errno.EIO), "/data/out/manifest.json")
    with pytest.raises(OSError) as caught:
        with user_errors():
            raise error
    assert caught.value is error


def test_naming_keeps_the_file_an_error_names_and_an_error_without_errno(tmp_path):
    """Only an OSError that names no file (a write's ENOSPC) is given the path: one that names a file names
    the right one, and one with no errno (no strerror to give) goes on as it is."""
    named = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "other"))
    bare = OSError("no errno")
    for error in (named, bare):
        with pytest.raises(OSError) as caught:
            with naming(tmp_path / "file"):
                raise error
        assert caught.value is error
    with pytest.raises(OSError) as caught:
        with naming(tmp_path / "file"):
            raise OSError(errno.ENOSPC, "Error writing bytes to file")  # pyarrow's wording, the errno kept
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
        errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "file"))


def test_sigterm_interrupts_raises_terminated_for_sigterm_and_keyboardinterrupt_for_ctrl_c():
    """A bench stopped by Ctrl-C exits 130, by `kill` 143: each signal keeps its own exception and code."""
    with pytest.raises(KeyboardInterrupt) as caught:
        with sigterm_interrupts((signal.SIGTERM, signal.SIGINT)) as noted:
            signal.raise_signal(signal.SIGINT)
    assert type(caught.value) is KeyboardInterrupt and noted == [] and stop_code(noted) == 130
    with pytest.raises(Terminated):
        with sigterm_interrupts((signal.SIGTERM, signal.SIGINT)) as noted:
            signal.raise_signal(signal.SIGTERM)
    assert noted == [signal.SIGTERM] and stop_code(noted) == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers put back


@pytest.mark.parametrize("signum, code, line", [(signal.SIGTERM, 143, "terminated\n"),
                                                (signal.SIGUSR1, 138, "stopped by SIGUSR1\n"),
                                                (signal.SIGINT, 130, "interrupted\n")],
                         ids=["sigterm", "sigusr1", "ctrl-c"])
def test_a_signal_sigterm_interrupts_raises_ends_the_command_with_its_line_and_code(signum, code, line, capsys):
    """128 + the signal, as README says: train.py's SIGUSR1 (its fetch of a set URL, --test-only) said `terminated`
    and exited 143, as SIGTERM does."""
    with pytest.raises(SystemExit) as caught:
        with user_errors(), sigterm_interrupts((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
            signal.raise_signal(signum)
    assert (caught.value.code, capsys.readouterr().err) == (code, line)


@pytest.mark.parametrize("n, noun, said", [
    (1, "shard", "1 shard"), (2, "shard", "2 shards"), (0, "shard", "0 shards"), (1, "class", "1 class"),
    (2, "class", "2 classes"), (1, "batch", "1 batch"), (2, "batch", "2 batches"), (2, "epoch", "2 epochs"),
    (1, "warm-up step", "1 warm-up step"), (2, "warm-up step", "2 warm-up steps")])
def test_plural_is_the_noun_after_one_and_its_plural_after_any_other_count(n, noun, said):
    """Messages said '1 shards', 'has 1 val images', '1 warm-up steps'."""
    assert f"{n} {plural(n, noun)}" == said


def test_signals_deferred_raises_the_first_signal_held_after_the_block():
    """Ctrl-C then SIGTERM during the block: the Ctrl-C comes after it (the first), as it would have at once."""
    from pipeline.errors import signals_deferred

    with pytest.raises(KeyboardInterrupt) as caught:
        with sigterm_interrupts((signal.SIGTERM, signal.SIGINT)) as noted:
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
    assert type(caught.value) is KeyboardInterrupt and noted == []


def test_hide_password_hides_a_password_after_a_scheme_in_capitals():
    """URL schemes are case-insensitive: HTTPS://user:password@ is a login as https:// is."""
    assert hide_password("HTTPS://ann:pw@h/x and Http://bob:secret@h/y") == "HTTPS://ann:***@h/x and Http://bob:***@h/y"
