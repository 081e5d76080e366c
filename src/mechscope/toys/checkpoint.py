"""Resumable training state for the toys: atomic writes, and a settings check when resuming.

A training loop saves everything its next step depends on (weights, optimiser, the data
generator's state, the curves so far) with `save_state` every few steps, and calls
`load_state` when it starts: a run interrupted at any point continues from the last save and
ends with the same weights as an uninterrupted run. (`mechscope.toys.modular` keeps
its own state layout, with the epoch and the LR scheduler, written with `atomic_save`.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mechscope.errors import LoadError

STATE_FILE = "state.pt"
"""Name of the training-state file inside a run directory."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then ``os.replace`` it: the file is never half written.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "x.pt"
        >>> atomic_save({"step": 3}, path)
        >>> torch.load(path, weights_only=True), sorted(p.name for p in path.parent.iterdir())
        ({'step': 3}, ['x.pt'])
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_state(path: str | os.PathLike, map_location: str | torch.device = "cpu", keys: tuple[str, ...] = ()) -> dict:
    """A training-state file as a dict (``torch.load`` with ``weights_only=True``).

    A damaged or foreign file, or one missing any of ``keys``, raises a `LoadError` naming the
    path and how to start afresh.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "state.pt"
        >>> _ = path.write_bytes(b"PK not a state")
        >>> read_state(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechscope.errors.LoadError: .../state.pt is not a readable training state (...); delete it ...
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc).strip()
        first = message.split("\n")[0].strip()
        # torch's message for an unpicklable file suggests weights_only=False: never pass that on
        reason = type(exc).__name__ if not first or "weights" in message.lower() else first
        raise LoadError(
            f"{path} is not a readable training state ({reason}); delete it (or use another directory) "
            "to start the run afresh"
        ) from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise LoadError(
            f"{path} is not a training state of this run (no {', '.join(missing)}); delete it (or use another "
            "directory) to start the run afresh"
        )
    return state


def save_state(out_dir: str | os.PathLike, config: dict, step: int, **state) -> None:
    """Write ``out_dir/state.pt`` atomically: the run's ``config``, the ``step`` reached and ``state``.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> save_state(out, {"lr": 0.1, "steps": 10}, 4, history=[1.0])
        >>> load_state(out, {"lr": 0.1, "steps": 20}, resumable=("steps",))["step"]
        4
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({"config": config, "step": step, **state}, out / STATE_FILE)


def load_state(out_dir: str | os.PathLike, config: dict, resumable: tuple[str, ...] = ()) -> dict | None:
    """The state saved in ``out_dir`` (``None`` if there is none), after checking its settings.

    Every entry of ``config`` except those named in ``resumable`` must equal the saved run's;
    otherwise a `LoadError` names the differing fields with their saved values. Tensors load
    on the CPU, with ``weights_only=True``; a damaged file is a `LoadError` naming it (`read_state`).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> load_state(out, {"lr": 0.1}) is None
        True
        >>> save_state(out, {"lr": 0.1}, 4)
        >>> load_state(out, {"lr": 0.2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechscope.errors.LoadError: ... holds a run with other settings (lr=0.1); use another directory or ...
    """
    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        return None
    state = read_state(path, keys=("config", "step"))
    saved = state["config"]
    changed = sorted(k for k in config if k not in resumable and saved.get(k) != config[k])
    if changed:
        raise LoadError(
            f"{Path(out_dir)} holds a run with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); "
            "use another directory or the same settings"
        )
    return state


def resume(
    out_dir: str | os.PathLike | None,
    config: dict,
    resumable: tuple[str, ...],
    steps: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[list, int]:
    """Restore ``model``, ``optimizer`` and ``generator`` from ``out_dir``'s state, if any.

    Returns the saved curve and the step to continue from (``[]`` and 0 for a fresh run or no
    directory). A saved run already past ``steps`` raises a `LoadError`.

    Example:
        >>> import tempfile
        >>> out, net = tempfile.mkdtemp(), torch.nn.Linear(2, 2)
        >>> opt, gen = torch.optim.SGD(net.parameters(), lr=0.1), torch.Generator()
        >>> save_state(out, {"steps": 10}, 4, model=net.state_dict(), optimizer=opt.state_dict(),
        ...            generator=gen.get_state(), history=[[0.5]])
        >>> resume(out, {"steps": 10}, ("steps",), 10, net, opt, gen)
        ([[0.5]], 4)
    """
    state = load_state(out_dir, config, resumable) if out_dir is not None else None
    if state is None:
        return [], 0
    if state["step"] > steps:
        raise LoadError(
            f"{out_dir} holds a run trained for {state['step']} steps, more than steps={steps}; "
            f"pass steps >= {state['step']} or another directory"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["history"], state["step"]
