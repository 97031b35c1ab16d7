"""Context switches of every live thread of a process (/proc/PID/task/*/status)."""
import os


def ctx(pid: int) -> tuple[int, int, int]:
    """(voluntary, nonvoluntary, threads) summed over the process's live threads."""
    v = n = k = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        v += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        n += int(line.split()[1])
            k += 1
        except FileNotFoundError:
            pass
    return v, n, k
