"""The ``lumireg`` command line: what every command shares."""

from lumireg import cli
from lumireg.contract import EXIT_INTERRUPTED
from lumireg.evaluate import runner


def test_ctrl_c_exits_with_the_interrupted_code(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert cli.main(["evaluate", "-i", "fields", "-d", "truth", "-c", "config.json"]) == EXIT_INTERRUPTED
    assert "lumireg evaluate: interrupted" in capsys.readouterr().err
