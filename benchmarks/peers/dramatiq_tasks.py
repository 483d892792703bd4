"""The no-op workload for Dramatiq on Redis (imported by the workers and the bench)."""

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6399/0")
broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)
counter = redis.Redis.from_url(URL)


@dramatiq.actor(max_retries=0)
def noop(n):
    counter.incr("tq-bench-done")  # the task's durable "result"
