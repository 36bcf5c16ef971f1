"""How the command ends its process (cli._leave): the atexit hooks and the flushes happen,
the exit statuses stay, and the interpreter's teardown is skipped."""

import subprocess
import sys

# A teardown witness (its __del__ runs only when the interpreter frees the
# module's globals at exit) and an atexit hook, then the CLI as the script runs it.
PROLOGUE = """
import atexit, sys
class Witness:
    def __del__(self):
        sys.stderr.write("teardown\\n")
witness = Witness()
atexit.register(lambda: sys.stderr.write("atexit hook\\n"))
sys.argv = ["tcpidle"] + %r
from tcpidle.cli import main
"""


def run(args, call="main()"):
    return subprocess.run([sys.executable, "-c", PROLOGUE % (args,) + call],
                          capture_output=True, text=True, timeout=60)


def test_the_command_line_leaves_without_teardown_but_runs_atexit_and_flushes():
    r = run(["--version"])
    assert r.returncode == 0
    assert r.stdout == "tcpidle, version 0.1.0\n"  # buffered by click.echo, flushed at the end
    assert "atexit hook" in r.stderr
    assert "teardown" not in r.stderr  # the interpreter did not free the module's objects


def test_exit_statuses_are_kept():
    r = run(["kill", "--no-such-option"])
    assert r.returncode == 2 and "error: No such option" in r.stderr
    assert "atexit hook" in r.stderr and "teardown" not in r.stderr
    r = run(["kill", "-d", "1", "--use-proc", "--destroy-with", "netlink"])
    assert r.returncode == 2 and "exclude each other" in r.stderr


def test_an_argv_given_in_process_raises_systemexit_as_before():
    r = run([], "try:\n    main(['--version'])\nexcept SystemExit as e:\n"
                "    sys.stderr.write('status %r\\n' % (e.code,))\n")
    assert r.returncode == 0 and "status 0" in r.stderr
    assert "teardown" in r.stderr  # a normal interpreter exit: nothing skipped


def test_a_reader_gone_is_said_once_and_exits_1_as_before():
    import os
    rd, wr = os.pipe()
    os.close(rd)  # the reader is gone before anything is written
    p = subprocess.run([sys.executable, "-c", PROLOGUE % (["--help"],) + "main()"],
                       stdout=wr, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(wr)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr


def test_a_stdout_that_cannot_be_flushed_at_the_end_gives_status_120_as_python_does():
    code = ("import sys\nfrom tcpidle import cli\n"
            "class Stuck:\n    def write(self, t): return len(t)\n"
            "    def flush(self): raise BrokenPipeError(32, 'Broken pipe')\n"
            "sys.stdout = Stuck()\ncli._leave(0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 120, r.stderr
    code = code.replace("raise BrokenPipeError(32, 'Broken pipe')", "pass")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
