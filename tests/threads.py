"""Run one function per simulated worker in threads (with the in-process backend)."""

from __future__ import annotations

import threading


def run_workers(fn, num_workers: int, timeout: float = 120.0) -> list:
    """fn(rank) in num_workers threads; returns results in rank order, re-raises the first error."""
    results: list = [None] * num_workers
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(num_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"workers still running after {timeout}s")
    if errors:
        raise errors[0]
    return results
