#!/usr/bin/env python3
"""The functions of berth that its processes run, for link/code-order.txt.

  code-order.py touched BINARY PHASE OUT PID...
      appends to OUT, one JSON line per PID, the code pages of BINARY that
      the process has mapped (ELF addresses; the binary is linked at a fixed
      address, see build.rs), with the process's name and PHASE.
  code-order.py order BINARY PROFILE OUT
      writes OUT: the functions on those pages, as the linker is to place
      them: the monitors', the zygote's, the daemon's in phase "steady"
      (kubelet's periodic calls), then the rest the daemon ran.

hack/code-order.sh runs both around a profiled daemon.
"""
import bisect
import json
import os
import struct
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def touched(binary, phase, out, pids):
    binary = os.path.realpath(binary)
    with open(out, "a") as sink:
        for pid in pids:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/maps") as f:
                    maps = f.read().splitlines()
                pagemap = open(f"/proc/{pid}/pagemap", "rb")
            except OSError:
                continue  # gone meanwhile
            pages = []
            with pagemap:
                for line in maps:
                    fields = line.split()
                    if len(fields) < 6 or fields[1] != "r-xp":
                        continue
                    if os.path.realpath(fields[5]) != binary:
                        continue
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    pagemap.seek(lo // PAGE * 8)
                    entries = pagemap.read((hi - lo) // PAGE * 8)
                    for i in range((hi - lo) // PAGE):
                        if struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
                            pages.append(lo + i * PAGE)
            if pages:
                record = {"pid": int(pid), "comm": comm, "phase": phase, "pages": pages}
                sink.write(json.dumps(record) + "\n")


def functions(binary):
    """(start, end, name) of every function with a size, in address order."""
    header = subprocess.run(["readelf", "-h", binary], check=True,
                            capture_output=True, text=True).stdout
    if "EXEC (Executable file)" not in header:
        sys.exit(f"{binary} is not linked at a fixed address (BERTH_PIE?): "
                 "its mapped addresses are not its ELF addresses")
    nm = subprocess.run(["nm", "-S", "-n", "--defined-only", binary], check=True,
                        capture_output=True, text=True).stdout
    found = []
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW":
            start, size = int(parts[0], 16), int(parts[1], 16)
            if size:
                found.append((start, start + size, parts[3]))
    return found


def order(binary, profile, out):
    funcs = functions(binary)
    starts = [f[0] for f in funcs]

    def on_pages(pages):
        hit = set()
        for page in pages:
            i = max(bisect.bisect_right(starts, page) - 1, 0)
            while i < len(funcs) and funcs[i][0] < page + PAGE:
                if funcs[i][1] > page:
                    hit.add(i)
                i += 1
        return hit

    groups = {"monitor": set(), "zygote": set(), "steady": set(), "daemon": set()}
    with open(profile) as f:
        for line in f:
            record = json.loads(line)
            if record["comm"] == "berth-monitor":
                group = "monitor"
            elif record["comm"] == "berth-zygote":
                group = "zygote"
            elif record["phase"] == "steady":
                group = "steady"
            else:
                group = "daemon"
            groups[group] |= on_pages(record["pages"])
    placed = set()
    with open(out, "w") as sink:
        for name, group in groups.items():
            group -= placed
            placed |= group
            for i in sorted(group):  # address order keeps callers near callees
                sink.write(funcs[i][2] + "\n")
            size = sum(funcs[i][1] - funcs[i][0] for i in group)
            print(f"code-order: {name}: {len(group)} functions, {size // 1024} KiB",
                  file=sys.stderr)


def main():
    if len(sys.argv) >= 5 and sys.argv[1] == "touched":
        touched(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif len(sys.argv) == 5 and sys.argv[1] == "order":
        order(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
