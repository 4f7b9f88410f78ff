"""A helper process spoken to in JSON lines over stdin/stdout: how the benchmarks run
transformers with no engine thread alive in its process (a fair peer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


class JsonLinesChild:
    """`python -m module *args` with OMP_NUM_THREADS=threads; `call` sends one message and
    waits for its one-line reply. The child exits at the end of its input."""

    def __init__(self, module: str, threads: int, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self.module = module

    def call(self, message: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.module} exited (status {self.proc.wait()}); see its stderr above")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        """End the child; safe to call twice."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
