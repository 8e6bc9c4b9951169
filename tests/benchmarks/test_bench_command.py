"""`lumireg bench <name>`: one subcommand per benchmark, each with only its own options."""

import re
import subprocess
import sys

import pytest

from lumireg.benchmarks import BENCHMARKS
from lumireg.cli import main
from lumireg.contract import EXIT_USAGE

OPTIONS = {  # every option each subcommand takes, and no other
    "service": {"--url", "--metrics-url", "--batch-sizes", "--concurrency", "--requests", "--warmup", "--out"},
    "load": {"--url", "--metrics-url", "--rate", "--duration", "--outputs", "--bad-request-every", "--soak", "--out"},
    "kernels": {"--device", "--shape", "--batch-sizes", "--warmup", "--repeats", "--sweep-blocks", "--out"},
    "traffic": {"--shape", "--ops", "--out"},
    "accuracy": {"--pairs", "--methods", "--checkpoint", "--shape", "--sets", "--refine-steps", "--out"},
    "refine": {"--device", "--steps", "--similarities", "--repeats", "--shape", "--out"},
    "align": {"--device", "--poses", "--modes", "--similarities", "--shape", "--out"},
    "capacity": {"--replicas", "--device-dir", "--service", "--requests", "--seed"},
}


def _help(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", OPTIONS)
def test_each_benchmark_takes_only_its_own_options(name, capsys):
    assert set(BENCHMARKS) == set(OPTIONS)
    text = _help(name, capsys)
    assert text.startswith(f"usage: lumireg bench {name} ")
    assert set(re.findall(r"(?m)^  (--[\w-]+)", text)) == OPTIONS[name]  # one line per option in --help


def test_bench_alone_lists_the_benchmarks_and_exits_with_the_usage_code(capsys):
    assert main(["bench"]) == EXIT_USAGE
    err = capsys.readouterr().err
    for name, line in BENCHMARKS.items():
        assert name in err and line.split()[0] in err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["bench", "kernels", "--pairs", "3"], "unrecognized arguments: --pairs 3"),  # an accuracy option
        (["bench", "service", "--rate", "2"], "unrecognized arguments: --rate 2"),  # a load option
        (["bench", "--kernels", "--accuracy"], "unrecognized arguments"),  # the old mode flags
        (["bench", "latency"], "invalid choice"),
    ],
)
def test_options_of_another_benchmark_are_refused_with_the_usage_code(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_USAGE
    assert says in capsys.readouterr().err


def test_listing_the_benchmarks_imports_none_of_them():
    code = (
        "import sys, contextlib, io\n"
        "from lumireg.cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    assert main(['bench']) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')\n"
        "             or m.startswith('lumireg.benchmarks.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
