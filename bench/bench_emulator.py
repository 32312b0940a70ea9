"""Benchmark the emulator: build a 100,000-item library and page through it over loopback HTTP.

Lists every movie and episode for one user in pages of 1,000 with ``Fields=Path,ProviderIds``
(what jfsync's full scan asks for), and prints the build time, the total listing time, per-page
p50/p95 latency and the process's peak RSS (emulator and client share the process).

    .venv/bin/python bench/bench_emulator.py [--items 100000] [--page-size 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time

import aiohttp

from jfsync.emulator import Emulator

API_KEY = "0123456789abcdef0123456789abcdef"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def run(items: int, page_size: int, version: str) -> int:
    """Build, list, report; return the exit status."""
    rss_start = peak_rss_mib()
    started = time.perf_counter()
    emu = Emulator(
        api_key=API_KEY,
        users=[("alice", "pw"), ("bob", "pw")],
        library_size=items,
        seed=1,
        server_version=version,
    )
    build_s = time.perf_counter() - started
    await emu.start()
    user_id = emu.user_id("alice")
    headers = {
        "Authorization": (
            'MediaBrowser Client="bench", Device="bench", DeviceId="bench-1", '
            f'Version="0", Token="{API_KEY}"'
        )
    }
    page_times: list[float] = []
    seen = 0
    total_reported = -1
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            list_started = time.perf_counter()
            start = 0
            while True:
                params = {
                    "userId": user_id,
                    "Recursive": "true",
                    "IncludeItemTypes": "Movie,Episode",
                    "Fields": "Path,ProviderIds",
                    "SortBy": "SortName",
                    "SortOrder": "Ascending",
                    "EnableImages": "false",
                    "StartIndex": str(start),
                    "Limit": str(page_size),
                }
                t0 = time.perf_counter()
                async with session.get(emu.url + "/Items", params=params) as resp:
                    resp.raise_for_status()
                    body = await resp.json()
                page_times.append(time.perf_counter() - t0)
                total_reported = body["TotalRecordCount"]
                page = body["Items"]
                seen += len(page)
                start += len(page)
                if not page or start >= total_reported:
                    break
            list_s = time.perf_counter() - list_started
    finally:
        await emu.close()
    print(f"emulator {version}: {len(emu.library)} items ({items} movies+episodes), 2 users")
    print(f"library build      : {build_s:.2f} s")
    print(
        f"listed             : {seen} of {total_reported} in {len(page_times)} pages of {page_size}"
    )
    print(f"total listing time : {list_s:.2f} s")
    print(
        f"per page p50 / p95 : {percentile(page_times, 50) * 1000:.1f} / "
        f"{percentile(page_times, 95) * 1000:.1f} ms (first page {page_times[0] * 1000:.1f} ms)"
    )
    print(f"peak RSS           : {peak_rss_mib():.0f} MiB (process start {rss_start:.0f} MiB)")
    return 0 if seen == items == total_reported else 1


def main() -> int:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--server-version", default="10.10.7")
    args = parser.parse_args()
    return asyncio.run(run(args.items, args.page_size, args.server_version))


if __name__ == "__main__":
    sys.exit(main())
