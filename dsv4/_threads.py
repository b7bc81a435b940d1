"""The default thread count: the CPUs this process may run on, capped by its cgroup's CPU
quota. OpenMP's own default counts the CPUs of the affinity mask but not a container's
quota, so a container limited to 2 CPUs on a 64-core host would run 64 threads."""
import math
import os

MAX_THREADS = 1024      # what set_num_threads accepts


def _mounts(mountinfo):
    """(mount point, root, fs type, super options) of each cgroup mount."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                out.append((fields[4], fields[3], tail[0], tail[2].split(",")))
    return out


def _memberships(cgroup):
    """{"v2": path} and/or {"cpu": path}: this process's cgroup in each hierarchy."""
    out = {}
    with open(cgroup) as f:
        for line in f:
            hid, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            if hid == "0" and controllers == "":
                out["v2"] = path
            elif "cpu" in controllers.split(","):
                out["cpu"] = path
    return out


def _dirs(mount, root, path):
    """The cgroup's directory and its parents up to the mount point, innermost first."""
    inside = root == "/" or path == root or path.startswith(root + "/")
    rel = os.path.relpath(path, root) if inside else "."
    d = os.path.normpath(os.path.join(mount, rel))
    if not d.startswith(mount):        # a path outside the mount (cgroup namespaces)
        d = mount
    dirs = [d]
    while dirs[-1] != mount and len(dirs[-1]) > len(mount):
        dirs.append(os.path.dirname(dirs[-1]))
    return dirs


def _read(path):
    try:
        with open(path) as f:
            return f.read().split()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(mountinfo="/proc/self/mountinfo", cgroup="/proc/self/cgroup"):
    """The CPU quota of this process's cgroup and its parents, rounded up to whole CPUs
    (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us); None where there is none."""
    try:
        mounts, member = _mounts(mountinfo), _memberships(cgroup)
    except (OSError, UnicodeDecodeError):
        return None
    limits = []
    for mount, root, fstype, opts in mounts:
        if fstype == "cgroup2" and "v2" in member:
            for d in _dirs(mount, root, member["v2"]):
                v = _read(os.path.join(d, "cpu.max"))
                if v and len(v) == 2 and v[0] != "max":
                    limits.append((v[0], v[1]))
        elif fstype == "cgroup" and "cpu" in opts and "cpu" in member:
            for d in _dirs(mount, root, member["cpu"]):
                q = _read(os.path.join(d, "cpu.cfs_quota_us"))
                p = _read(os.path.join(d, "cpu.cfs_period_us"))
                if q and p:
                    limits.append((q[0], p[0]))
    cpus = []
    for quota, period in limits:
        try:
            quota, period = int(quota), int(period)
        except ValueError:
            continue
        if quota > 0 and period > 0:        # v1 writes -1 for no quota
            cpus.append(max(1, math.ceil(quota / period)))
    return min(cpus) if cpus else None


def default_num_threads():
    """The CPUs of the affinity mask, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def threads_from_environment(set_num_threads, environ=os.environ):
    """DSV4_NUM_THREADS if set, else OMP_NUM_THREADS left to OpenMP, else the default."""
    value = environ.get("DSV4_NUM_THREADS")
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"environment variable DSV4_NUM_THREADS: expected an integer "
                             f"in [1, {MAX_THREADS}], got {value!r}")
        set_num_threads(n)
    elif not environ.get("OMP_NUM_THREADS"):
        set_num_threads(min(default_num_threads(), MAX_THREADS))


# what the OpenMP runtime reads once, when dsv4._C loads it
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


class passive_wait:
    """While dsv4._C loads: OMP_WAIT_POLICY=PASSIVE unless the caller set a wait policy.

    OpenMP's default keeps idle workers spinning for a while after each parallel region.
    On a machine whose cores run other jobs (parallel test runs, CI), those spinning
    workers take the time slices the working thread needs, and a call can take ten times
    longer; passive workers sleep at once. The variable is removed again afterwards, so
    child processes and other OpenMP runtimes (torch's) see the caller's environment."""

    def __enter__(self):
        self.set = not any(v in os.environ for v in _WAIT_VARS)
        if self.set:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    def __exit__(self, *exc):
        if self.set:
            os.environ.pop("OMP_WAIT_POLICY", None)
