"""Submit typed tasks and wait for their results.

    python producer.py

Where it submits: the same settings as the ``tq`` command (TQ_BROKER,
TQ_CA, TQ_KEY or TQ_JOIN, the config file, else the local ``tq up``), or
call ``tq.configure(broker=..., ca=..., key=...)`` first.
"""

from __future__ import annotations

import json

from tasks import send_welcome, word_count


def main() -> None:
    # submit_sync returns once the broker has the task on disk
    welcome = send_welcome.submit_sync(to="ada@example.com", name="Ada", language="fr")
    counted = word_count.submit_sync("the cat and the dog and the bird", top=2)
    print(json.dumps({"task": welcome.id, "result": welcome.result(timeout=60)}))
    print(json.dumps({"task": counted.id, "result": counted.result(timeout=60)}))

    # arguments are checked against the signature before anything is sent
    try:
        send_welcome.submit_sync(to="bob@example.com", name=42)  # type: ignore[arg-type]
    except TypeError as exc:
        print(json.dumps({"refused": str(exc)}))

    # a handle says how the task is doing and can cancel it
    print(json.dumps({"state": welcome.status().state.value}))


if __name__ == "__main__":
    main()
