"""Publish latency counted where it is observed (the publisher process), without prometheus_client
there: the process stays small, and bucket counts travel to the service, which serves them."""
from bisect import bisect_left

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600)


class LatencyCounts:
    """Histogram counts kept where the observations happen (the publisher process), merged
    where they are served: bucket counts add up, so deltas travel instead of every value."""

    def __init__(self):
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds):
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def take(self):
        """(bucket counts, sum) since the last take, or None when nothing was observed."""
        if not any(self.buckets):
            return None
        out = (self.buckets, self.sum)
        self.buckets, self.sum = [0] * len(self.buckets), 0.0
        return out

    def add(self, delta):
        buckets, total = delta
        self.buckets = [a + b for a, b in zip(self.buckets, buckets)]
        self.sum += total
