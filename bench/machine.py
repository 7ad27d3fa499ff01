"""What the benchmark ran on, for the head of bench/RESULTS.md:

    facts = machine.describe(work_dir, root)    # a dict, stored in results.json
    text = machine.text(facts)

CPUs (nproc and the model), RAM, the kernel, Python, the filesystem the Maildirs and spools
were on (findmnt, else /proc/mounts; and `stat -f`), and the commit measured (git rev-parse
HEAD, and whether the working tree's Python files differ from it).
"""
import os
import platform
import subprocess

COMMAND_TIMEOUT = 10            # seconds for findmnt, stat and git


def run(command, strip=True):
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return ""
    if done.returncode != 0:
        return ""
    return done.stdout.strip() if strip else done.stdout


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_mib():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def filesystem(path):
    found = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET,OPTIONS", "-T", path])
    if found:
        return found
    best, answer = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point, kind, options = line.split()[:4]
                if os.path.realpath(path).startswith(point) and len(point) >= len(best):
                    best, answer = point, f"{kind} {device} {point} {options}"
    except OSError:
        pass
    return answer


def commit(root):
    head = run(["git", "-C", root, "rev-parse", "HEAD"])
    if not head:
        return {"head": None, "dirty": []}
    status = run(["git", "-C", root, "status", "--porcelain", "--", "*.py"],
                 strip=False).splitlines()       # "XY path": the first column may be blank
    dirty = [line[3:] for line in status if line.strip() and not line[3:].startswith("bench/")]
    return {"head": head, "dirty": dirty}


def describe(work_dir, root):
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "ram_mib": ram_mib(),
            "kernel": platform.release(), "python": platform.python_version(),
            "filesystem": filesystem(work_dir),
            "statfs": run(["stat", "-f", "-c", "%T, block %S octets, %b blocks", work_dir]),
            "commit": commit(root)}


def text(facts):
    measured = facts["commit"]
    version = "an unknown commit" if not measured["head"] else f"commit `{measured['head']}`" \
        + (f", **dirty** (local changes in {', '.join(measured['dirty'])})"
           if measured["dirty"] else ", clean")
    ram = f"{facts['ram_mib']:,} MiB RAM" if facts["ram_mib"] else "RAM unknown"
    return "\n".join([
        f"- machine: {facts['nproc']} CPUs (`nproc`), {facts['cpu']}, {ram}, "
        f"Linux {facts['kernel']}",
        f"- Python {facts['python']}",
        f"- Maildirs, spools and queues on: `{facts['filesystem']}` (`stat -f`: "
        f"{facts['statfs'] or '?'})",
        f"- measured: {version}",
    ])
