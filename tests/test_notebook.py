"""The Colab notebook runs top to bottom on the CPU with the demo model, as a user would run it.

nbclient executes every cell in a real IPython kernel (the same Python as this test); a cell that
raises fails the test with the cell's traceback. On this CPU the notebook takes its CPU path:
demo model, no download, the disaggregated stack, a chat, the measurements and the benchmark.
"""

import base64
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "scripts" / "notebooks" / "splitserve_colab.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text or markdown."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "".join(parts)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_end_to_end_on_the_cpu_with_the_demo_model():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell errors

    code = [c for c in nb.cells if c.cell_type == "code"]
    out = "\n".join(_text(c) for c in code)
    assert "no TPU: the CPU path" in out and "model demo; platform cpu" in out
    # Both workers served, each in its own role, and the chat streamed tokens from them.
    assert "prefill  worker: cpu mesh tp=1" in out and "decode   worker: cpu mesh tp=1" in out
    assert out.count("finish: length") + out.count("finish: stop") == 2
    # The explanations quote numbers measured in this run, not placeholders.
    assert "tokens/s**" in out and "gave **" in out and "{" not in _text(_cell_with(code, "Prefill moved"))
    assert "colocated vs disaggregated" in out and "Short requests decoding while a long prompt" in out
    # The benchmark's PNG and the matplotlib chart are shown inline.
    images = [o["data"]["image/png"] for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2 and all(base64.b64decode(png)[:4] == b"\x89PNG" for png in images)


def _cell_with(cells, text):
    return next(c for c in cells if text in _text(c))
