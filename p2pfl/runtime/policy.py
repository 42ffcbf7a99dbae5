"""The node's resource policy: what a taskpack worker gets when its manifest asks for more,
or names nothing.

A manifest's `limits` are a request, never the last word: the effective limit is
min(request, policy maximum), and the policy default when the manifest names none. Nothing
is ever unlimited, so a manifest without `limits` cannot allocate the machine's memory.

    policy = ResourcePolicy(memory_bytes=2 << 30, max_memory_bytes=8 << 30)
    limits = policy.effective(spec.limits)
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.runtime.jobs import Limits

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class ResourcePolicy:
    """Defaults (when the manifest names nothing) and maxima (whatever it names)."""

    memory_bytes: int = 2 * GIB  # RLIMIT_AS: torch's import alone maps ~0.9 GiB
    max_memory_bytes: int = 8 * GIB
    cpu_seconds: int = 3600  # RLIMIT_CPU over the worker's life
    max_cpu_seconds: int = 24 * 3600
    timeout_s: float = 300.0  # per job, when the spec names none (<= 0)
    max_timeout_s: float = 6 * 3600.0
    nproc: int = 64  # processes + threads of one worker (RLIMIT_NPROC / pids cgroup)
    tmpfs_bytes: int = 256 * MIB  # each of the private /tmp and /dev/shm (bwrap >= 0.10)

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_seconds", "nproc", "tmpfs_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ResourcePolicy.{name} must be positive")
        if self.memory_bytes > self.max_memory_bytes:
            raise ValueError("ResourcePolicy.memory_bytes exceeds max_memory_bytes")
        if self.cpu_seconds > self.max_cpu_seconds:
            raise ValueError("ResourcePolicy.cpu_seconds exceeds max_cpu_seconds")
        if not 0 < self.timeout_s <= self.max_timeout_s:
            raise ValueError("ResourcePolicy.timeout_s must be in (0, max_timeout_s]")

    def effective(self, requested: Limits) -> Limits:
        """The limits a worker runs under, given what its spec (manifest) requested."""

        def pick(asked: float | None, default: float, maximum: float) -> float:
            return default if asked is None or asked <= 0 else min(asked, maximum)

        return Limits(
            timeout_s=pick(requested.timeout_s, self.timeout_s, self.max_timeout_s),
            memory_bytes=int(
                pick(requested.memory_bytes, self.memory_bytes, self.max_memory_bytes)
            ),
            cpu_seconds=int(pick(requested.cpu_seconds, self.cpu_seconds, self.max_cpu_seconds)),
            nproc=int(pick(requested.nproc, self.nproc, self.nproc)),
        )
