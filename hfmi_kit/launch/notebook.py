"""Run notebooks headless with papermill; paired ``.py`` percent scripts are accepted directly."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hfmi_kit.errors import NotebookError

LOGGER = logging.getLogger(__name__)


def read_notebook(path: str | Path) -> Any:
    """Read an ``.ipynb`` or a jupytext ``.py`` (cell tags such as ``parameters`` survive)."""
    import jupytext
    import nbformat

    p = Path(path)
    if not p.is_file():
        raise NotebookError(f"{p}: notebook not found")
    try:
        nb = jupytext.read(p) if p.suffix == ".py" else nbformat.read(p, as_version=4)
    except Exception as e:
        raise NotebookError(f"{p}: cannot be read as a notebook ({e})") from e
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


def has_parameters_cell(nb: Any) -> bool:
    return any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells)


def parameter_names(nb: Any) -> list[str]:
    """Names the ``parameters`` cell assigns at top level (empty without such a cell)."""
    import ast

    src = next((c.source for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), "")
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise NotebookError(f"the parameters cell is not valid Python ({e})") from e
    return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


def check_parameters(nb: Any, parameters: Mapping[str, Any], *, source: str | Path = "notebook") -> None:
    """Refuse parameters the notebook's ``parameters`` cell does not assign, or whose names are
    not Python identifiers (papermill would paste them into the injected cell as code).

    Raises:
        NotebookError: naming the parameters and listing the known ones.
    """
    import keyword

    if not parameters:
        return
    if not has_parameters_cell(nb):
        raise NotebookError(f"{source}: no cell tagged 'parameters'; cannot inject {sorted(parameters)}")
    bad = [k for k in parameters if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise NotebookError(f"{source}: parameter name(s) {bad} are not Python identifiers")
    known = parameter_names(nb)
    unknown = [k for k in parameters if k not in known]
    if unknown:
        raise NotebookError(f"{source}: unknown parameter(s) {unknown}; the parameters cell sets {known}")


def _running_cell(output: Path) -> str:
    """The cell papermill started last in ``output`` (it closes a dying cell as "completed")."""
    got = _cells_done(output)
    return got[1] if got is not None and got[1] else "unknown cell"


def _cells_done(output: Path) -> tuple[int, str] | None:
    """How many cells papermill has finished in ``output``, and the one it started last."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # not written yet, or caught mid-write
        return None
    meta = [c.get("metadata", {}).get("papermill", {}) for c in nb.cells]
    started = [i for i, m in enumerate(meta) if m.get("start_time")]
    done = sum(1 for m in meta if m.get("end_time"))
    if not started:
        return done, ""
    src = nb.cells[started[-1]].source.strip()
    return done, f"cell {started[-1]} ({(src.splitlines()[0] if src else '')[:60]!r})"


@contextlib.contextmanager
def _watch(src: Path, out: Path, cells: int, enabled: bool) -> Iterator[None]:
    """A status line at least every 10 s while the notebook runs: the cell running, the time
    elapsed and an estimate of the time left (from the cells done), read from the executed copy
    papermill saves as it goes."""
    from hfmi_kit.train.progress import Status

    with Status(f"hfmi run {src.name}", total=cells, enabled=enabled) as st:
        stop = threading.Event()

        def poll() -> None:
            seen = None
            while not stop.wait(3.0):
                try:
                    stamp = out.stat().st_mtime_ns
                except OSError:
                    continue
                if stamp == seen:  # re-read (it holds every output so far) only when papermill saved it
                    continue
                got = _cells_done(out)
                if got is not None:  # else caught mid-write: read it again next time
                    seen, st.finished, st.label = stamp, min(got[0], cells - 1), got[1]

        t = threading.Thread(target=poll, name=f"watch {src.name}", daemon=True)
        if enabled:
            t.start()
        try:
            yield
        finally:
            stop.set()
            if enabled:
                t.join()


def _private_kernel_manager(folder: Path) -> type | None:
    """A kernel manager whose kernel talks over Unix sockets inside ``folder``.

    Over TCP, jupyter_client picks free ports and closes them before the kernel binds them, so two
    notebooks started at once on a node (a test run, an array job) can race for the same port: the
    loser's heartbeat fails to bind and the run hangs until its timeout. Sockets in a private
    folder cannot collide, and no port is opened. ``None`` (the default TCP) where Unix sockets
    are not available, or the folder's path is too long for one.
    """
    if os.name == "nt" or len(str(folder)) > 80:  # sun_path holds 107 bytes, "kernel-NNNNN" included
        return None
    from jupyter_client.manager import AsyncKernelManager

    class PrivateKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = str(folder / "kernel")

    return PrivateKernelManager


def run_notebook(path: str | Path, parameters: Mapping[str, Any] | None = None, *,
                 output: str | Path | None = None, cwd: str | Path | None = None,
                 kernel_name: str = "python3", timeout: int | None = None, status: bool = True) -> Path:
    """Execute a notebook with papermill and return the executed ``.ipynb``.

    The notebook runs in ``cwd`` (default: the caller's working directory, so that relative paths
    given as parameters mean what they mean to the caller). The executed copy is a plain
    ``.ipynb`` (no jupytext pairing: opening it does not write a paired ``.py`` beside it) and is
    signed as trusted for this user, who ran it, so that its outputs render when opened. With
    ``status``, a line on stderr at least every 10 s says which cell runs (no silent minutes).

    Raises:
        NotebookError: a cell raised (with the cell and error), or the kernel died (with the
            cell that was running), or a parameter is not one the ``parameters`` cell sets
            (checked before the kernel starts).
    """
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    src = Path(path)
    nb = read_notebook(src)
    params = dict(parameters or {})
    check_parameters(nb, params, source=src)  # before the kernel starts
    nb.metadata.pop("jupytext", None)  # the executed copy is not one of the pair
    out = Path(output) if output else src.with_name(f"{src.stem}.out.ipynb")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / f"{src.stem}.ipynb"
        nbformat.write(nb, inp)
        manager = _private_kernel_manager(Path(tmp))
        engine = {"kernel_manager_class": manager} if manager else {}
        cells = sum(1 for c in nb.cells if c.cell_type == "code") + bool(params)  # + papermill's injected cell
        try:
            with _watch(src, out, max(cells, 1), status):
                pm.execute_notebook(str(inp), str(out), parameters=params, kernel_name=kernel_name,
                                    cwd=str(cwd or Path.cwd()), progress_bar=False, log_output=False,
                                    execution_timeout=timeout, **engine)
        except PapermillExecutionError as e:
            raise NotebookError(
                f"{src}: cell {e.exec_count} raised {e.ename}: {e.evalue} (executed notebook: {out})"
            ) from e
        except Exception as e:
            name = type(e).__name__
            if "DeadKernel" in name or "dead" in str(e).lower():
                raise NotebookError(
                    f"{src}: the kernel died while running {_running_cell(out)} (killed, e.g. out of "
                    f"memory?); partial output: {out}"
                ) from e
            raise NotebookError(f"{src}: notebook run failed ({name}: {e})") from e
    _trust(out)
    return out


def _trust(path: Path) -> None:
    """Sign the executed notebook in this user's Jupyter signature store (``jupyter trust``):
    its outputs came from the user's own run. A store that cannot be written is only logged."""
    import nbformat
    from nbformat.sign import NotebookNotary

    try:
        NotebookNotary().sign(nbformat.read(path, as_version=4))
    except Exception as e:  # a read-only home, a locked database: the notebook is still complete
        LOGGER.warning("%s: not marked as trusted (%s); run `jupyter trust %s`", path, e, path)
