"""The README's examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md block {i}", "exec"), {})


def test_readme_opens_with_the_two_commands_ci_runs():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first) == 2 and "flowsde" in first[0] and "pytest" in first[1]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = first[1].split("#")[0].strip()
    for part in test_cmd.split("&&"):
        assert part.strip() in ci, part
