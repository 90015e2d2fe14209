"""What the driver prints: progress lines while a job runs, and its summary at the end."""

from __future__ import annotations

import datetime
import sys
import time

from sculpt.outputs.stats import funnel_line


class Progress:
    def __init__(self, total: int, done: int, every: float, out=None):
        self.total, self.done, self.every, self.out = total, done, every, out
        self.done_before = done
        self.images = self.chunks = 0
        self.first_output: float | None = None  # seconds until the first row came out of the last stage
        self.start = self.last = time.monotonic()

    def rows(self, n: int) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic() - self.start
        self.images += n
        if time.monotonic() - self.last >= self.every:
            self.print()

    def unit(self, marker: dict, shard_done: bool) -> None:
        self.chunks += 1
        self.done += shard_done
        excluded = f", {marker['excluded']} excluded" if marker.get("excluded") else ""
        self.print(f"committed {marker['unit']} ({marker['images']} images, {marker['errors']} errors{excluded})")

    def print(self, event: str = "") -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        line = (f"[sculpt] shards {self.done}/{self.total} | chunks committed {self.chunks} | images {self.images} "
                f"| {rate:.2f} img/s")
        if self.total > self.done > self.done_before:  # from this run's shard rate, once a shard is done
            left = elapsed / (self.done - self.done_before) * (self.total - self.done)
            line += f" | ETA {datetime.timedelta(seconds=round(left))}"
        print(f"{line} | {event}" if event else line, file=self.out or sys.stdout, flush=True)


def rounded(value):
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def describe(summary: dict) -> list[str]:
    """The run summary as a person reads it (the numbers are also in OUT/.sculpt/stats.json and the markers)."""
    job = summary.get("job", {})
    whole = f"[sculpt] whole output ({summary['shards']} shards): {job.get('objects_per_image', 0):.1f} objects per image"
    if job.get("keep_rate") is not None:
        whole += f", {job['keep_rate']:.0%} of verified pairs kept"
    kinds = job.get("keep_rate_by_category", {})
    if kinds:
        whole += "; kept by kind: " + ", ".join(f"{kind} {rate:.0%}" for kind, rate in sorted(kinds.items()))
    if job.get("reasoning_pairs"):
        whole += f"; reasoning references kept {job.get('reasoning_kept', 0)} of {job['reasoning_pairs']}"
    if job.get("chat_turns"):
        whole += f"; grounded chat turns {job['chat_turns']}"
    excluded = f", {summary['excluded']} excluded by input.exclude" if summary.get("excluded") else ""
    lines = [f"[sculpt] this run: {summary['committed_now']} unit(s) committed, {summary['images']} images "
             f"({summary['errors']} errors{excluded}) in {summary['seconds']:.1f} s; {len(summary['pending'])} left pending"]
    if "job" in summary:  # absent when the statistics could not be read
        lines.append(whole)
    lines += [line for line in [funnel_line(job)] if line]  # the keep rule's funnel (sculpt/outputs/stats.py)
    rates = job.get("stage_images_per_second", {})
    if rates:
        lines.append("[sculpt] images/s per actor: " + ", ".join(f"{stage} {rate:.1f}" for stage, rate in rates.items()))
    return lines
