"""Process-group start-up through DeepSpeed (device-agnostic: gloo on CPU, NCCL on CUDA).

Start-up is split so that everything that can fail on bad input fails before any process
group exists: :func:`launch_info` reads what the launcher announced, :func:`prepare_rendezvous`
fills in a launcher-less run and checks that rank 0 can bind the rendezvous port, and
:func:`init_distributed` joins the group.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from megamm.config import ConfigError

# Environment variables by which a launcher announces a multi-process job, and the rank.
_WORLD_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")

log = logging.getLogger("megamm")


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job, as the launcher announced it (before any process group)."""

    world_size: int
    rank: int
    local_rank: int
    launched: bool
    """False for a plain ``python launchers/pretrain.py``: a world of one."""


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launch_info() -> LaunchInfo:
    """World size and ranks from the launcher's variables (deepspeed, torchrun, MPI)."""
    launched = any(os.environ.get(name, "").strip() for name in _WORLD_VARIABLES)
    return LaunchInfo(
        world_size=_first_int(_WORLD_VARIABLES, 1),
        rank=_first_int(_RANK_VARIABLES, 0),
        local_rank=_first_int(_LOCAL_RANK_VARIABLES, 0),
        launched=launched,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    """True if a listener holds ``host:port`` on this machine; False if free or ``host`` is not ours."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # the launcher's own problem; init_distributed reports it
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # TCPStore binds with SO_REUSEADDR too, so a port in TIME_WAIT is not reported.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
                continue  # EADDRNOTAVAIL: MASTER_ADDR is another host
    return False


def _mpi_launched() -> bool:
    """True under ``mpiexec``/``mpirun`` (MPICH/hydra or Open MPI) without torch's own variables."""
    return not os.environ.get("RANK", "").strip() and any(
        os.environ.get(name, "").strip() for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
    )


def _mpi_rendezvous() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE and MASTER_ADDR/PORT from MPI (mpi4py).

    The local rank counts the ranks on the same host. Unless the user set them, MASTER_ADDR is
    127.0.0.1 when every rank shares one host, else rank 0's host name, and MASTER_PORT is a port
    free on rank 0, which it announces. (DeepSpeed's own discovery would take the first address
    of ``hostname -I`` instead, which need not be one the other ranks can reach.)
    """
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            "launched by MPI (PMI_RANK/OMPI_COMM_WORLD_RANK is set) but mpi4py is not installed; "
            "pip install 'megamm[mpi]' (mpi4py and the mpich wheel) or launch with deepspeed/torchrun"
        ) from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    announced = _first_int(("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"), size)
    if size != announced:  # e.g. Open MPI's mpirun with an mpi4py built against MPICH
        raise ConfigError(
            f"the MPI launcher started {announced} ranks but mpi4py's MPI sees a world of {size}: mpi4py is "
            f"built against another MPI ({MPI.Get_library_version().splitlines()[0].strip()}) than the "
            "launcher's. Launch with that MPI's mpiexec (the mpich wheel's: python -m pip show mpich), or "
            "install mpi4py for the launcher's MPI"
        )
    hosts = comm.allgather(socket.gethostname())
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    port = os.environ.get("MASTER_PORT", "").strip()
    if not port:
        port = comm.bcast(str(free_port("127.0.0.1" if addr.startswith("127.") else "")) if rank == 0 else None)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(hosts[:rank].count(hosts[rank])),
        LOCAL_SIZE=str(hosts.count(hosts[rank])),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )


def prepare_rendezvous(info: LaunchInfo) -> None:
    """Fill in a launcher-less or MPI-launched run's rendezvous and check rank 0's port before
    any group starts.

    A launcher-less run uses 127.0.0.1 and ``MASTER_PORT`` if the user set it, else a free
    port. Under ``mpiexec`` the ranks and rendezvous come from MPI (:func:`_mpi_rendezvous`).
    Rank 0 hosts the rendezvous store, so it checks that ``MASTER_PORT`` is free on
    ``MASTER_ADDR`` (skipped under torchrun, whose agent already holds that port).

    Raises:
        ConfigError: the port is taken; the message names it and how to choose another.
    """
    if _mpi_launched():
        _mpi_rendezvous()
    if not info.launched:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for name, value in defaults.items():
            os.environ.setdefault(name, value)
        if not os.environ.get("MASTER_PORT", "").strip():
            os.environ["MASTER_PORT"] = str(free_port(os.environ["MASTER_ADDR"]))
    if info.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not host or not port.isdigit():
        return  # the launcher's own problem; init_distributed reports it
    if _port_in_use(host, int(port)):
        fix = (
            "pass another --master_port to the deepspeed launcher (or torchrun)"
            if info.launched
            else "unset MASTER_PORT to let megamm choose a free port, or set it to a free one"
        )
        raise ConfigError(
            f"MASTER_PORT={port} on MASTER_ADDR={host} is already in use (another run, or one that "
            f"has not exited yet); rank 0 needs it for the rendezvous. {fix[0].upper()}{fix[1:]}"
        )


def select_device(info: LaunchInfo) -> None:
    """Bind this process to its accelerator (GPU ``local_rank``); on CPU set the thread count."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(info.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins
        # Ranks on this host: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        names = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "WORLD_SIZE")
        local_world = next((int(os.environ[name]) for name in names if name in os.environ), 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))


def check_precision(precision: str) -> None:
    """Refuse a precision this machine's accelerator cannot train in (fp16 on CPU, say)."""
    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported.get(precision, False):
        usable = ", ".join(name for name, ok in supported.items() if ok)
        raise ConfigError(
            f"precision={precision}: the {accelerator.device_name()} accelerator cannot train in {precision}; "
            f"use one of {usable}"
        )


def init_distributed(info: LaunchInfo | None = None, timeout_s: float = 1800.0) -> None:
    """Join the job started by a launcher (deepspeed, torchrun, mpiexec).

    A plain ``python launchers/pretrain.py`` without launcher variables runs as a world of one
    on 127.0.0.1 (see :func:`prepare_rendezvous`). Given ``info``, the caller has already run
    :func:`prepare_rendezvous` with it (as preflight does); without, it runs here. A collective
    that waits longer than ``timeout_s`` for a rank fails (see :func:`is_collective_timeout`).
    """
    if info is None:
        info = launch_info()
        prepare_rendezvous(info)
    select_device(info)
    _warn_of_stale_op_build_lock()
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        timeout=timedelta(seconds=timeout_s),
    )
    _unlink_shm_buffer(info)


_STALE_LOCK_SECONDS = 15 * 60


def _warn_of_stale_op_build_lock() -> None:
    """Name the lock a killed DeepSpeed op build left behind: start-up would wait on it forever."""
    if get_accelerator().device_name() != "cpu":
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError, RuntimeError):
        return
    if age > _STALE_LOCK_SECONDS:
        log.warning(
            "DeepSpeed's op build lock %s is %.0f minutes old: a build killed midway leaves it, and start-up "
            "then waits forever. If no build runs, delete it (tools/setup_env.sh removes such locks)",
            lock,
            age / 60,
        )


# DeepSpeed's CPU all-reduce (its shm comm op) maps one shared-memory segment per local rank,
# named after the rendezvous, and never unlinks it: every run would leave about 69 MB of RAM
# per rank in /dev/shm, and a later run on the same port could map a dead run's segment.
_SHM_DIR = Path("/dev/shm")


def _unlink_shm_buffer(info: LaunchInfo) -> None:
    """Remove this rank's shm all-reduce segment from /dev/shm once every rank has mapped all of
    them (after a barrier); the mappings, and so the all-reduce, stay valid until exit."""
    if get_accelerator().device_name() != "cpu" or not _SHM_DIR.is_dir():
        return
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{info.rank}"
    )
    if info.world_size > 1:
        torch.distributed.barrier()  # shm_initialize has opened every peer's segment by now
    (_SHM_DIR / name).unlink(missing_ok=True)


def is_peer_failure(error: BaseException) -> bool:
    """True if ``error`` is a collective failing because another rank went away."""
    text = str(error)
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
    return type(error).__name__ in ("DistBackendError", "DistNetworkError", "RuntimeError") and any(
        marker in text for marker in markers
    )


def is_collective_timeout(error: BaseException) -> bool:
    """True if ``error`` is a collective that gave up waiting for a rank (a hung or stopped peer)."""
    text = str(error).lower()
    return type(error).__name__ in ("DistBackendError", "DistError", "RuntimeError") and (
        "timed out" in text or "timeout" in text
    )


def device() -> torch.device:
    """This rank's compute device."""
    return torch.device(get_accelerator().current_device_name())


def synchronize() -> None:
    """Wait for the accelerator's queued work (for timing; a no-op on CPU)."""
    get_accelerator().synchronize()
