"""The README's claims hold: its Python blocks run, its commands' flags exist, its links resolve, and the scores
it quotes for the published weights are the ones the files record."""
import ast
import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

import train
from config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
TINY = dict(dataset="synthetic", image_size=28, synthetic_size=32, conv_dim=16, batch_size=4, steps=2, sample_every=1,
            quiet=True, device="cpu", threads=1)


def test_every_python_block_of_the_readme_runs(tmp_path):
    """Run in a folder holding what the blocks name: a tiny comparison in runs/cmp and the published weights."""
    train.compare(TrainConfig(**TINY, out=str(tmp_path / "runs" / "cmp")))
    (tmp_path / "weights").symlink_to(ROOT / "weights")
    assert len(PYTHON_BLOCKS) >= 2
    for index, block in enumerate(PYTHON_BLOCKS):
        script = tmp_path / f"block{index}.py"
        script.write_text(block)
        ran = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert ran.returncode == 0, f"README block {index} failed:\n{block}\n{ran.stderr[-2000:]}"
    assert (tmp_path / "demo" / "comparison.gif").is_file() and (tmp_path / "demo" / "attention.png").is_file()


def readme_commands() -> dict[str, set[str]]:
    """The flags each of the repository's scripts is given anywhere in the README, by script."""
    flags = {}
    runner = r"\S*python\s+|torchrun\s+(?:--\S+\s+)*|make\s+\S+\s+ARGS=\""
    for line in re.findall(rf"^\s*(?:{runner})?(\w+\.py\b.*)$", README, re.M):
        script, *words = line.split()
        if (ROOT / script).is_file():
            flags.setdefault(script, set()).update(word.split("=")[0] for word in words if word.startswith("--"))
    return flags


def script_help(script: str) -> str:
    """A script's own --help text, run in this process (torch is imported once for all of them)."""
    helped = io.StringIO()
    argv = sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(helped), pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_.value.code in (0, None)
    return helped.getvalue()


@pytest.mark.parametrize("script", sorted(readme_commands()))
def test_every_flag_the_readme_gives_a_script_exists(script):
    missing = sorted(flag for flag in readme_commands()[script] if flag not in script_help(script))
    assert not missing, f"the README gives {script} flags it does not have: {missing}"


def test_every_notebook_parameter_the_readme_sets_exists():
    """`-p NAME VALUE` (demo.py, papermill, make demo ARGS) names a TrainConfig field or a notebook's own setting."""
    own = set()
    for notebook in ("SAGAN_mnist.ipynb", "SAGAN_celeba.ipynb"):
        cells = nbformat.read(ROOT / notebook, as_version=4).cells
        (parameters,) = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
        own |= {node.targets[0].id for node in ast.parse(parameters.source).body if isinstance(node, ast.Assign)}
    named = set(re.findall(r"(?<![\w-])-p\s+(\w+)", README))
    assert len(named) >= 3
    unknown = named - own - set(TrainConfig.__dataclass_fields__)
    assert not unknown, f"the README sets notebook parameters that do not exist: {sorted(unknown)}"


OTHER_TOOLS_FLAGS = {"--logdir", "--help"}  # tensorboard's, and every script's


def test_every_flag_the_readme_names_in_its_prose_is_a_flag_of_one_of_the_scripts():
    helps = "".join(script_help(script) for script in ("train.py", "study.py", "results.py", "evaluate.py", "bench.py",
                                                        "pictures.py"))
    prose = re.sub(r"```.*?```", "", README, flags=re.S)  # fences hold backticks of their own
    spans = re.findall(r"`([^`]+)`", prose)
    named = {flag for span in spans for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span)}
    assert len(named) > 20
    missing = sorted(flag for flag in named - OTHER_TOOLS_FLAGS if flag not in helps)
    assert not missing, f"the README names flags no script has: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_and_picture_of_the_readme_resolves():
    anchors = {slug(heading) for heading in re.findall(r"^#+ (.*)$", README, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"no heading for the link {target}"
        else:
            assert (ROOT / target).exists(), f"the README links to {target}, which does not exist"


def test_the_scores_the_readme_quotes_for_published_weights_are_those_the_files_record():
    rows = re.findall(r"^\| `(weights/[\w.]+)` \| (\d+) \| (\d+) \| [\w ]+? ([\d.]+) \((\d+) samples\)"
                      r"(?:, digit read back ([\d.]+)%)?", README, re.M)
    published = {path.relative_to(ROOT).as_posix() for path in (ROOT / "weights").glob("*.pt")} - {
        "weights/mnist_classifier.pt"}  # the evaluation's feature network, not a generator
    assert {row[0] for row in rows} == published, "every published generator has a row in the README's table"
    for path, seed, step, value, n, accuracy in rows:
        weights = torch.load(ROOT / path, weights_only=True)
        score = weights["score"]
        assert (weights["config"]["seed"], weights["step"]) == (int(seed), int(step)), path
        assert (f"{score['value']:.2f}", score["n"]) == (value, int(n)), path
        if score.get("requested_accuracy") is not None or accuracy:
            assert f"{100 * score['requested_accuracy']:.1f}" == accuracy, path
        assert f"`{score['command']}`" in README, f"the README does not give the command that reproduces {path}"
