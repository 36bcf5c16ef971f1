"""tcpidle(8) is in step with the click commands and README.md.

The page is generated (python -m tcpidle.manpage, by scripts/setup); these
tests check that the generation carries every command, option, example, the
output contract and the exit statuses.  tests/kernel/test_install.py checks
that the installed page is the current rendering.
"""

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from tcpidle import manpage
from tcpidle.cli import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_option_of_every_command_is_on_the_page():
    page = manpage.render(README)
    root = click.Context(cli, info_name="tcpidle")
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        assert ".SS tcpidle %s" % name in page
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for opt in param.opts + param.secondary_opts:
                    assert manpage.escape(opt) in page, "%s %s not on the page" % (name, opt)
                if isinstance(param, click.Option) and param.help:
                    assert manpage.escape(param.help.split(".")[0]) in page.replace("\n", " ")
        if command.epilog:
            assert manpage.escape(command.epilog.split("\n")[1]) in page
        # the command's examples (its \b block of its docstring)
        for line in (command.help or "").splitlines():
            if line.strip().startswith("tcpidle "):
                assert manpage.escape(line.strip()) in page, line


def test_explain_is_on_the_page_with_its_argument_and_its_json_keys():
    page = manpage.render(README)
    assert ".B tcpidle explain\n.RI [ OPTIONS ]\n.I CONNECTION\n.br" in page
    assert ".SS tcpidle explain" in page
    assert "CONNECTION is a socket cookie" in page.replace("\n", " ")
    for key in ("verdict_rule", "kill.clauses", "tcp_info.snd_wnd", "peer_cookie"):
        assert "\\fB%s\\fR" % manpage.escape(key) in page, key


def test_keepalive_is_on_the_page_with_its_actions():
    page = manpage.render(README)
    assert ".SS tcpidle keepalive" in page and ".B tcpidle keepalive" in page
    flat = page.replace("\n", " ")
    for action in ("keepalive-set", "would-set-keepalive", "keepalive-on"):
        assert manpage.escape(action) in flat, action


def test_output_contract_and_exit_status_come_from_readme():
    page = manpage.render(README)
    output = re.search(r"^### Output\n(.*?)^## ", README, re.M | re.S).group(1)
    keys = re.findall(r"^\| `([a-z_]+)`", output, re.M)
    assert "cookie" in keys and "idle_ms" in keys
    for key in keys:
        assert "\\fB%s\\fR" % manpage.escape(key) in page
    exit_para = re.search(r"\*\*Exit status\*\*: (.*?)\n\n", README, re.S).group(1)
    first_words = " ".join(exit_para.split()[:6])
    assert manpage.escape(first_words) in page
    with pytest.raises(ValueError):
        manpage.render(README.replace("### Output", "### Outputs"))


def test_escape_keeps_roff_controls_out_of_text():
    assert manpage.escape(".hidden\n'quote\n-x") == "\\&.hidden\n\\&'quote\n\\-x"
    assert manpage.inline_md("use `--json` **now**") == "use \\fB\\-\\-json\\fR \\fBnow\\fR"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff (man-db's formatter) not installed")
def test_page_formats_without_warnings(tmp_path):
    page = tmp_path / "tcpidle.8"
    page.write_text(manpage.render(README))
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
