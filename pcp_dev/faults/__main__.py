"""`python -m pcp_dev.faults --schedules N --seed S`: run the campaign, print the table.

Exits 1 when any invariant broke, after printing the failing seeds with their traces.
`--replay SEED` plays one schedule and prints its whole trace.
"""

from __future__ import annotations

import argparse
import sys

from pcp_dev.faults.campaign import failure_text, run_campaign, run_schedule, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcp_dev.faults", description=__doc__)
    parser.add_argument("--schedules", type=int, default=1000, help="how many schedules")
    parser.add_argument("--seed", type=int, default=1, help="the campaign's seed")
    parser.add_argument("--replay", type=int, metavar="SEED",
                        help="play one schedule by its seed and print its trace")
    parser.add_argument("--show", type=int, default=3,
                        help="how many failing schedules to print with their traces")
    args = parser.parse_args(argv)
    if args.replay is not None:
        report = run_schedule(args.replay)
        print("\n".join(report.trace))
        print("\n".join(report.violations) or "no invariant broken")
        return 1 if report.violations else 0
    if args.schedules < 1:
        parser.error("--schedules must be at least 1")
    tally = run_campaign(args.schedules, args.seed)
    for report in tally.failed[: args.show]:
        print(failure_text(report), file=sys.stderr)
        print(file=sys.stderr)
    print(table(tally, args.seed))
    return 1 if tally.total_violations else 0


if __name__ == "__main__":
    sys.exit(main())
