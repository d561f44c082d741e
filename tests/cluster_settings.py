"""What the test sessions' Ray clusters get, in one place: tests/conftest.py applies it, and
benchmarks/launch_time.py --test-cluster measures a launch under it. No side effects on import."""

# Ray Train's controller takes the workers' reports at each health check (2 s by Ray's default) and a
# worker's next report waits for it: a tiny run that reports every 0.1 s would wait 2 s a report.
# Ray ends a worker process idle for 1 s once more than num_cpus of them are idle, so each launch of
# a test started its Ray Data tasks' processes afresh; tests launch back to back, so their clusters
# keep idle workers for 2 min (a tiny launch 17 s instead of 20 s: docs/benchmarks.md, "[4/6] What a
# launch costs"). Ray runs its worker processes at nice 15, below `make test`'s fast tier (nice 10,
# beside the Ray tier): at nice 5 the Ray tests' workers come first and the fast tier takes what they
# leave (the Ray tier 358 s instead of about 400: docs/benchmarks.md, "[4/6] `make test`'s time").
# User clusters keep Ray's settings.
TEST_CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_idle_worker_killing_time_threshold_ms": "120000",
                    "RAY_num_workers_soft_limit": "10", "RAY_worker_niceness": "5"}

SMALL = {"train": 2048, "test": 512}  # images of the small Fashion-MNIST (tests use at most 1,024 / 256)
