"""leukodiff's benchmark suite: speed, memory, scaling and training cost against peers.

    python -m benchmarks.run            # full run (~30 min on 2 cores), writes docs/BENCHMARKS.md
    python -m benchmarks.run --quick    # smoke test: 3 fields, 3 runs, small sizes (~3 min)

Every measured system runs in its own subprocess (`benchmarks.child`) so peak
RSS is its own and thread pools or allocators never leak between systems; the
parent (`benchmarks.run`) only schedules, collects JSON and writes the report.
"""
