"""io/interrupt: a Ctrl-C whose KeyboardInterrupt was lost (raised inside a weakref callback,
printed as "Exception ignored") still stops a command before its output is moved into place."""

from __future__ import annotations

import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

import mergelang as ml
from mergelang.io import interrupt

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_a_lost_interrupt_stops_the_move_into_place(tmp_path):
    """The handler records the signal; the exception dies in a callback (as Python drops it);
    the folder output is not written and KeyboardInterrupt comes out of the run."""
    from test_resume import make_models

    make_models(tmp_path, n=4)
    (tmp_path / "r.mrg").write_text('model a = "models/a"\nmodel b = "models/b"\nmerge from a {\n'
                                    '    "*" => a * 0.5 + b * 0.5\n}\n')
    recipe = ml.compile(tmp_path / "r.mrg")
    # the handler raising inside a weakref callback: Python prints and drops the exception
    obj = type("O", (), {})()
    ref = weakref.ref(obj, lambda _: interrupt._handler(signal.SIGINT, None))  # noqa: SLF001
    del obj
    assert ref() is None
    try:
        with pytest.raises(KeyboardInterrupt):
            recipe.run(tmp_path / "out", device="cpu")
        assert not (tmp_path / "out").exists()
    finally:
        interrupt.arm()  # clears the record (and leaves pytest's handler where it is not Python's)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_command_arms_the_handler_unless_sigint_starts_ignored():
    """`mergelang` (cli.entry) records Ctrl-C; where SIGINT starts ignored (a background job of a
    non-interactive shell) it stays ignored."""
    code = ("import signal, mergelang.io.interrupt as i; i.arm(); "
            "print(signal.getsignal(signal.SIGINT) is i._handler)")

    def start_with(disposition):  # noqa: ANN001, ANN202
        return lambda: signal.signal(signal.SIGINT, disposition) and None

    for disposition, armed in ((signal.SIG_DFL, "True"), (signal.SIG_IGN, "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                             preexec_fn=start_with(disposition))
        assert out.stdout.strip() == armed, out.stderr
