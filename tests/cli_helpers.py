"""Running the command line inside the test process, and what its errors look like."""
from xpmodel import cli


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `xpmodel ARGS` run in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:   # argparse's --help and usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
