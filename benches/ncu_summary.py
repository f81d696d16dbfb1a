"""Per-kernel device time from an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum
--csv --log-file F ...`): total, count and share of each kernel name, largest first.

    python3 benches/ncu_summary.py F [top]
"""

import csv
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) == 3 else 25
    with open(sys.argv[1], newline="") as f:
        # ncu writes its own log lines (==PROF==) before the CSV header.
        lines = [l for l in f if l.startswith('"')]
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(row["Metric Value"].replace(",", "")) * UNITS[row["Metric Unit"]]
        name = row["Kernel Name"].split("(")[0]
        total[name] += us
        count[name] += 1
    if not total:
        sys.exit(f"no gpu__time_duration.sum rows in {sys.argv[1]}")
    all_us = sum(total.values())
    print(f"{sum(count.values())} kernels, {all_us:.1f} us of device time")
    print(f"{'kernel':<60} {'calls':>6} {'total us':>10} {'mean us':>9} {'share':>6}")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name[:60]:<60} {count[name]:>6} {us:>10.1f} {us / count[name]:>9.2f} {us / all_us:>6.1%}")


if __name__ == "__main__":
    main()
