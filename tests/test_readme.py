"""README's commands are what CI runs, and its worked example runs and prints what it says."""

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    head = README.split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert len(commands) == 2
    assert "examples/digits.py" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


# every ```python block runs; ```py blocks are fragments (they need a model or files)
RUNNABLE = _blocks("python")


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) == 7


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_python_example_runs_and_prints_its_comments(index):
    import jax

    code = RUNNABLE[index]
    out = io.StringIO()
    with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    # expected output: the "# ..." lines right after each print(...) line
    expected, after_print = [], False
    for line in code.splitlines():
        if line.startswith("# ") and after_print:
            expected.append(line[2:])
            continue
        after_print = line.startswith("print(")
    assert out.getvalue().splitlines() == expected
