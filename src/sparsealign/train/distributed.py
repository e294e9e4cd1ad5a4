"""Several processes (``sparsealign train --nproc N``, ``accelerate launch``): the engine the accelerate config
asks for is the engine that runs, a failure is reported once, and the launcher stops the others.

* :func:`check_engine` (in each process) and :func:`refuse_engine` (``--nproc`` with ``--accelerate-config``,
  before any process starts): an accelerate config asking for FSDP or DeepSpeed where accelerate sets up
  another engine is refused in one line. accelerate (1.16) builds FSDP and DeepSpeed only on GPU-type
  devices: with CPU processes it runs plain data parallel (DDP over gloo) whatever the config says, without
  a word. (torch 2.13 itself runs FSDP2's ``fully_shard`` on CPU over gloo; FSDP1 refuses CPU: "FSDP needs a
  non-CPU accelerator device".)
* :func:`claim_failure` / :func:`earlier_failure`: the first process to fail records itself in the launcher's
  rendezvous store (torchrun's agent store, which outlives the workers) and reports its error; the others,
  whose errors follow from it (a connection closed by the dead peer, the launcher's SIGTERM), stay quiet and
  exit with the first one's status. Without an agent store (another launcher) every process reports.
* :func:`run_launcher`: ``accelerate launch`` inside this process, so that a failed process ends the launch
  with its exit status and no launcher traceback: torchrun already stops the other processes (SIGTERM) as
  soon as one fails.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from sparsealign.errors import TrainingError

logger = logging.getLogger(__name__)

FAILURE_KEY = "sparsealign/first_failure"
"""The key of the rendezvous store under which the first failed process writes ``"<rank>:<status>"``."""

_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
"""The environment flags ``accelerate launch`` sets from a config's ``distributed_type``, and that type."""


def process_rank() -> int:
    """This process's rank under a launcher (``RANK``), 0 without one."""
    return int(os.environ.get("RANK", "0"))


def is_launched() -> bool:
    """Whether this process is one of several started by a launcher (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_engine(distributed_type: str, device_type: str, environ: dict[str, str] | None = None) -> None:
    """Refuse a run whose accelerate config asks for FSDP or DeepSpeed (``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED``, set by ``accelerate launch``) when accelerate set up another engine
    (``distributed_type``, the value of the accelerator's ``DistributedType``) on ``device_type``: the run
    would otherwise go on unsharded, without a word."""
    env = os.environ if environ is None else environ
    for flag, engine in _ENGINES.items():
        if env.get(flag, "false").lower() == "true":
            refuse_engine(engine, distributed_type, device_type)


def config_engine(path: Path) -> str | None:
    """The ``distributed_type`` an accelerate config file asks for (``MULTI_GPU``, ``FSDP``, ...), or None."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TrainingError(
            f"The accelerate config {path} is not valid YAML: {error}".splitlines()[0]
        ) from None
    return (
        str(loaded["distributed_type"]) if isinstance(loaded, dict) and "distributed_type" in loaded else None
    )


def refuse_engine(requested: str | None, actual: str, device_type: str) -> None:
    """A :class:`TrainingError` when the engine an accelerate config asks for (``requested``, its
    ``distributed_type``: ``FSDP``, ``DEEPSPEED``) is not the one accelerate runs (``actual``)."""
    if requested not in _ENGINES.values() or requested == actual:
        return
    from accelerate import __version__ as accelerate_version

    name = "FSDP" if requested == "FSDP" else "DeepSpeed"
    raise TrainingError(
        f"The accelerate config asks for {name}, but accelerate {accelerate_version} sets up {name} only on "
        f"GPUs: these {device_type.upper()} processes would run unsharded ({actual}). Train on CPU with "
        f"`sparsealign train --nproc N` (data parallel); use the {name} config on GPUs."
    )


def _agent_store() -> Any:
    """A client of the launcher's rendezvous store, or None when the store is not the launcher's (torchrun
    sets ``TORCHELASTIC_USE_AGENT_STORE=True`` when its agent hosts it) or cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    from torch.distributed import TCPStore

    try:
        return TCPStore(
            host, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False
        )
    except RuntimeError as error:  # DistNetworkError and the like
        logger.debug("the launcher's store at %s:%s is not reachable: %s", host, port, error)
        return None


def claim_failure(status: int) -> int | None:
    """Record that this process failed with exit ``status``. None when it is the first process of the launch
    to fail (it reports the error), else the first one's status (this process exits quietly with it)."""
    if not is_launched():
        return None
    store = _agent_store()
    if store is None:
        return None
    mine = f"{process_rank()}:{status}"
    first = store.compare_set(FAILURE_KEY, "", mine).decode()
    return None if first == mine else int(first.split(":")[1])


def earlier_failure() -> int | None:
    """The exit status of a process of this launch that failed already, or None (no claim is made)."""
    if not is_launched():
        return None
    store = _agent_store()
    if store is None or not store.check([FAILURE_KEY]):
        return None
    return int(store.get(FAILURE_KEY).decode().split(":")[1])


def _quiet_launcher_logs() -> None:
    """Silence torchrun's agent (its start-up notes, "Sending process ... closing signal SIGTERM", "failed
    (exitcode: 1)"): the failed process reports its own error."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def failed_status(failures: dict[int, Any], nproc: int) -> int:
    """The exit status of a launch whose processes ended with ``failures`` (rank -> torchrun's
    ``ProcessFailure``: ``exitcode``, negative for a signal, and ``timestamp``).

    A process that exited on its own printed its error: its status, and nothing more is said. A process
    killed by a signal other than the SIGTERM the launcher sends to the survivors (SIGKILL: out of memory?)
    printed nothing: one line names it, and the status is 128 + the signal (also when only SIGTERMs ended
    the processes)."""
    order = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    exited = [failure.exitcode for _, failure in order if failure.exitcode > 0]
    killed = [(rank, failure) for rank, failure in order if failure.exitcode < 0]
    outside = [(rank, failure) for rank, failure in killed if failure.exitcode != -signal.SIGTERM]
    if exited and not outside:
        return exited[0]
    rank, first = (outside or killed)[0]
    try:
        name = signal.Signals(-first.exitcode).name
    except ValueError:
        name = f"signal {-first.exitcode}"
    hint = " (out of memory?)" if name == "SIGKILL" else ""
    print(
        f"error: process {rank} of {nproc} was killed by {name}{hint}; the others were stopped.",
        file=sys.stderr,
        flush=True,
    )
    return 128 - first.exitcode


def run_launcher(launch_args: list[str], env: dict[str, str], nproc: int, verbose: bool = False) -> int:
    """Run ``accelerate launch LAUNCH_ARGS`` in this process with ``env`` added to the environment, and
    return the launch's exit status (:func:`failed_status` when a process failed)."""
    os.environ.update(env)
    import torch.distributed.run  # noqa: F401  (torchrun's loggers exist once it is imported)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_args)
    if not verbose:
        _quiet_launcher_logs()
    try:
        launch_command(args)
    except ChildFailedError as error:
        return failed_status(error.failures, nproc)
    return 0
