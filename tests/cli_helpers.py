"""Running the command line inside the test process, what its errors look like,
and a small corpus to train on."""
import random

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


def write_corpus(path, lines=1500, seed=0):
    """Deterministic English-like text, about 45 KB."""
    words = ("the king shall speak of love and war to my lord good night sweet prince "
             "what is this fair day come hither now").split()
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path
