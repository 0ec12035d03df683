"""One gloo transport device for every process group of a CPU run on one host.

torch gives each gloo process group a transport device of its own, and each device runs a
loop thread that wakes every 10 ms (gloo's `epoll_wait` timeout) whether or not anything is
sent. megatron's `initialize_model_parallel` makes ~21 groups (TP, PP, DP, CP, EP, embedding,
their gloo twins...), so a one-process run kept ~2,100 wake-ups a second: 2.2% of a core with
nothing to communicate (`/proc/<pid>/task/*/stat`, 22 ticks in 10 s idle against 1 with one
shared device). On a machine whose cores are all busy (2 cores, the benchmark's side-by-side
runs, data workers) that is taken from training (issue 31, docs/performance.md).

A device can serve many contexts (gloo's design: torch itself spreads groups over the devices
of `GLOO_SOCKET_IFNAME`), so with one process every group gets the same one. Several processes
on one host share one too since their gradients go through shared memory
(`runtime.host_collectives`); ranks on several hosts keep torch's device per group: there the
groups carry the real traffic, and one loop thread for all of them measured slower for a
3.2 MB DP all-reduce (4.7 against 3.8–4.3 ms, 2 ranks).
"""

from __future__ import annotations

import datetime
import os

_state: dict[str, object] = {}


def share_one_device() -> bool:
    """From now on, gloo process groups created in this process share one transport device.

    Call before `init_process_group`. Returns False if it was done before."""
    from torch.distributed import distributed_c10d as c10d

    if "devices" in _state:
        return False
    base = c10d.ProcessGroupGloo
    devices: list = []

    class SharedDeviceGloo(base):
        """torch's ProcessGroupGloo on the process's one device (list), created with the first group."""

        def __init__(self, store, rank, size, options=None, timeout: datetime.timedelta | None = None):
            if options is None:
                if not devices:
                    devices.extend(_devices(base))
                options = base._Options()
                options._devices = list(devices)
                options._threads = 2 * len(devices)  # torch's own count: two workers per device
                options._timeout = timeout if timeout is not None else datetime.timedelta(minutes=30)
            super().__init__(store, rank, size, options)

    c10d.ProcessGroupGloo = SharedDeviceGloo
    _state["devices"] = devices
    return True


def _devices(base) -> list:
    """What torch would give one group: a device per interface of GLOO_SOCKET_IFNAME, else the default."""
    names = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    if names:
        return [base.create_device(interface=name) for name in names]
    return [base.create_default_device()]
