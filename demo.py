"""`make demo`: run a notebook headless in a Jupyter kernel, showing in the terminal what it is doing, and keep it.

    python demo.py                                  # SAGAN_mnist.ipynb as it is
    python demo.py -p steps 200 -p eval_n 500       # with parameters, as papermill's -p injects them
    python demo.py SAGAN_celeba.ipynb -p steps 500

While the notebook runs, the terminal shows the section being executed and a progress bar per model (read from the
run folders' metrics.csv); at the end it prints the notebook's quality table. The executed notebook, with every
picture and table, is written to runs/demo/<notebook> (also when a cell fails, to show where), and the pictures the
notebook makes to runs/demo/<notebook name>/ (the notebook's demo_dir; pass -p demo_dir demo to write demo/).
"""
import argparse
import ast
import queue
import sys
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

from config import ARMS, arm_folder
from rundir import last_logged_step

ROOT = Path(__file__).resolve().parent


class NotebookRunner(NotebookClient):
    """nbclient's NotebookClient, waiting for the kernel's messages in one-second slices. Its wait can miss the wake-up
    of a reply that has already arrived (jupyter/nbclient#312; here after cells that display ipywidgets), and then
    returns only when the cell's timeout ends, or, with none, never. The poll at the end of each slice finds it."""

    async def async_start_new_kernel_client(self):
        client = await super().async_start_new_kernel_client()
        for channel in (client.shell_channel, client.iopub_channel):
            channel.get_msg = in_slices(channel.get_msg)
        return client


def in_slices(get_msg, seconds: float = 1.0):
    """`get_msg(timeout)` as a series of waits of at most `seconds`, raising queue.Empty only once `timeout` is over."""
    async def get_msg_in_slices(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = seconds if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(seconds, left))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    return get_msg_in_slices


def parameter_value(text: str):
    """A -p value as papermill reads it: a Python literal where it is one (200, 2e-4, None, True), else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def with_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """The notebook with `parameters` assigned in a cell right after its parameters cell, as papermill does."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    return notebook


def setting(notebook: nbformat.NotebookNode, parameters: dict, name: str):
    """A parameter's value: as injected, else as the parameters cell assigns it."""
    if name in parameters:
        return parameters[name]
    cell = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    return None


class Progress:
    """Bars per model, fed by polling the run folders while the notebook trains."""

    def __init__(self, out: Path, steps: int):
        self.out = out
        self.bars = {arm: tqdm(total=steps, desc=f"{ARMS[arm].label:>24}", unit="step", position=index, leave=True,
                               dynamic_ncols=True) for index, arm in enumerate(ARMS)}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.stop.wait(2.0):
            self.update()

    def update(self) -> None:
        for arm, bar in self.bars.items():
            bar.n = min(last_logged_step(arm_folder(self.out, arm)), bar.total)
            bar.set_postfix_str("done" if bar.n >= bar.total else "training" if bar.n else "waiting", refresh=False)
            bar.refresh()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.update()
        for bar in self.bars.values():
            bar.close()


def heading_before(notebook: nbformat.NotebookNode, index: int) -> str | None:
    """The section a cell belongs to: the last markdown heading above it."""
    for cell in reversed(notebook.cells[:index]):
        if cell.cell_type == "markdown" and cell.source.startswith("#"):
            return cell.source.splitlines()[0].lstrip("# ").strip()
    return None


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.get("name") == "stdout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", nargs="?", default="SAGAN_mnist.ipynb")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a notebook parameter (any TrainConfig field, or the notebook's own settings)")
    parser.add_argument("--output", help="where the executed notebook goes (default: runs/demo/<notebook>)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds a cell may take (default: no limit)")
    args = parser.parse_args(argv)
    source = Path(args.notebook)
    output = Path(args.output or Path("runs") / "demo" / source.name)
    # the pictures go beside the executed notebook, not over the published ones in demo/, unless asked
    parameters = {"demo_dir": (output.parent / output.stem).as_posix()} | {
        name: parameter_value(value) for name, value in args.parameter}
    notebook = with_parameters(nbformat.read(source, as_version=4), parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    out, steps = Path(setting(notebook, parameters, "out")), setting(notebook, parameters, "steps")

    progress: list[Progress] = []
    current = {"section": None}

    def on_cell_start(cell, cell_index):
        section = heading_before(notebook, cell_index)
        if section and section != current["section"]:
            current["section"] = section
            tqdm.write(f"[{source.name}] {section}")
        if "compare(config," in cell.source and not progress:
            progress.append(Progress(out, steps))

    def on_cell_executed(cell, cell_index, execute_reply):
        if progress and "compare(config," in cell.source:
            progress.pop().close()

    client = NotebookRunner(notebook, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}},
                            on_cell_start=on_cell_start, on_cell_executed=on_cell_executed)
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        if progress:
            progress.pop().close()
        nbformat.write(notebook, output)
        print(f"\n{error}\n\nThe notebook stopped at that cell; what ran is in {output}", file=sys.stderr)
        return 1
    nbformat.write(notebook, output)
    quality = [cell for cell in notebook.cells if cell.cell_type == "code" and "comparison_table(" in cell.source]
    if quality and printed(quality[0]).strip():
        print(f"\nSample quality:\n\n{printed(quality[0]).rstrip()}")
    print(f"\nThe executed notebook, with every picture and table: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
