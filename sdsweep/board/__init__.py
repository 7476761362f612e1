"""The verdict of a sweep, from its folders alone: leaderboard CSVs, terminal table, report.html.
`python -m sdsweep.board SWEEP_DIR` rebuilds them."""
