"""Split a generated kernel's rows over torch's OpenMP threads in native code: one ctypes call per kernel call.

threads.py hands row chunks to a ctypes callback per team thread: each chunk takes the GIL to start its
kernel call (~5-20 us a call, and the two threads queue on the GIL), so a weight had to be large (16 MiB)
before splitting paid, and a 2-core decode step read most weights on one core at about half the memory
bandwidth (MKL's fp32 GEMV: 17-19 GB/s with 2 threads; a streaming sum: 50 GB/s).

Here the team body is a few lines of LLVM IR, built once per process by llvmlite: `GOMP_parallel` of torch's
libgomp (the workers already spinning after a torch op) runs it on each thread; it copies the kernel's packed
scalars to its own stack, takes `chunk` rows at a time from an atomic counter (a thread that starts late
takes fewer), writes the chunk into the row_begin/row_end scalars and calls the kernel's packed entry
`_mlir_<name>(void **args)`. Any packed kernel works (object or torch-mlir JIT): the entry is an address.
Rows are the kernel's contract: the caller's chunk edges keep row blocks whole.

The job is int64 slots named by JOB_FIELDS: the kernel's entry, its scalars' address and count, the index of
row_begin among them (row_end follows), row_begin, row_end, rows per chunk, the next-chunk counter. `available()` is False without llvmlite or
a loaded GOMP_parallel: threads.py runs the chunks then.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

from .objects import available as llvmlite_available, host_engine
from .threads import gomp_parallel_address

# the job's int64 slots, in order: what the team body reads (fill_job writes them, run_job resets the counter)
JOB_FIELDS = ("fn", "scalars", "count", "slot", "begin", "end", "chunk", "counter")
JOB_SLOTS = len(JOB_FIELDS)
COUNTER = JOB_FIELDS.index("counter")
_POINTERS = {"fn", "scalars"}


def _job_loads() -> str:
    """Each job field as an SSA value (`%fn`, ...); the counter stays an address (it is updated atomically)."""
    lines = []
    for i, field in enumerate(JOB_FIELDS):
        lines.append(f"  %{field}_at = getelementptr i64, ptr %job, i64 {i}")
        if field != "counter":
            lines.append(f"  %{field} = load {'ptr' if field in _POINTERS else 'i64'}, ptr %{field}_at")
    return "\n".join(lines)


_TEAM_IR = r"""
define void @sparsecc_team_body(ptr %job) {
entry:
""" + _job_loads() + r"""
  %own = alloca i64, i64 %count, align 8
  %args = alloca ptr, i64 %count, align 8
  br label %copy
copy:
  %i = phi i64 [ 0, %entry ], [ %next, %copy ]
  %from = getelementptr i64, ptr %scalars, i64 %i
  %value = load i64, ptr %from
  %to = getelementptr i64, ptr %own, i64 %i
  store i64 %value, ptr %to
  %arg = getelementptr ptr, ptr %args, i64 %i
  store ptr %to, ptr %arg
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, %count
  br i1 %more, label %copy, label %work
work:
  %taken = atomicrmw add ptr %counter_at, i64 1 monotonic
  %offset = mul i64 %taken, %chunk
  %lo = add i64 %begin, %offset
  %done = icmp sge i64 %lo, %end
  br i1 %done, label %exit, label %run
run:
  %hi_full = add i64 %lo, %chunk
  %short = icmp slt i64 %end, %hi_full
  %hi = select i1 %short, i64 %end, i64 %hi_full
  %lo_at = getelementptr i64, ptr %own, i64 %slot
  store i64 %lo, ptr %lo_at
  %hi_slot = add i64 %slot, 1
  %hi_at = getelementptr i64, ptr %own, i64 %hi_slot
  store i64 %hi, ptr %hi_at
  call void %fn(ptr %args)
  br label %work
exit:
  ret void
}
"""


class _Team:
    """The built team body and GOMP_parallel, bound as ctypes functions."""

    def __init__(self, gomp_address: int):
        self._engine = host_engine(_TEAM_IR)        # owns the code
        self.body = self._engine.get_function_address("sparsecc_team_body")
        self.parallel = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                         ctypes.c_uint)(gomp_address)


@functools.lru_cache(maxsize=1)
def _team() -> Optional[_Team]:
    gomp = gomp_parallel_address()
    if gomp is None or not llvmlite_available():
        return None
    try:
        return _Team(gomp)
    except RuntimeError:       # llvmlite's LLVM refused the IR: threads.py's callbacks run the chunks
        return None


def available() -> bool:
    """Rows can be split in native code here."""
    return _team() is not None


def fill_job(job, entry: int, scalars, count: int, row_slot: int, rows: int, chunk: int) -> None:
    """Write a job running the packed kernel at `entry` over rows [0, rows) in `chunk`-row pieces; `scalars`
    holds its `count` packed scalars (row_begin at `row_slot`, row_end after it). `job` is JOB_SLOTS int64
    of the caller's own (a concurrent call has its own)."""
    fields = {"fn": entry, "scalars": ctypes.addressof(scalars), "count": count, "slot": row_slot, "begin": 0,
              "end": rows, "chunk": chunk, "counter": 0}
    job[0:JOB_SLOTS] = [fields[name] for name in JOB_FIELDS]


def run_job(job, threads: int) -> None:
    """Run a filled job on `threads` OpenMP threads (the calling one included); returns when all rows ran."""
    team = _team()
    job[COUNTER] = 0
    team.parallel(team.body, ctypes.addressof(job), threads, 0)
