"""Every error the library raises on purpose derives from :class:`HiproError`,
so callers (the CLI among them) catch one type. Each class also keeps the
builtin base that describes it (``ValueError`` for bad input, ``RuntimeError``
for a failed run) so ``except ValueError`` code keeps working.
tests/test_errors.py fails on a bare builtin raise anywhere in the package.
The compiled ops' argument checks (csrc/checks.cpp) raise torch's
RuntimeError, as every torch op does.

This module sits below every layer and imports nothing of the package.
"""
from __future__ import annotations

from pathlib import Path


class HiproError(Exception):
    """Base of all hipro_fast errors; the message names the culprit."""


# ---------------------------------------------------------------- generic
class InvalidInputError(HiproError, ValueError):
    """An argument, option or file content outside what is accepted (an unknown
    mode, a value out of range, a file of the wrong kind); the message names it
    and what is accepted."""


class InvalidTypeError(HiproError, TypeError):
    """An argument of the wrong type, or an option a function does not have."""


class MissingFileError(HiproError, FileNotFoundError):
    """A file or directory the caller named does not exist; the message names it."""


class ExtensionUnavailableError(HiproError, RuntimeError):
    """An op that only the compiled extension has, asked for without it (see
    ``hipro_fast.build_info()``)."""


# ----------------------------------------------------------------- engine
class DeviceMismatchError(HiproError, RuntimeError):
    """A fused op's arguments on different devices, named by the fake (meta)
    kernels; a RuntimeError like the compiled ops' own argument checks."""


class ForestError(HiproError, ValueError):
    """A malformed prompt forest; the message names the culprit."""


class UnsupportedTextTower(HiproError, ValueError):
    """The model's text tower is not causal + EOS(argmax)-pooled (or has an unsupported part)."""


# ------------------------------------------------------------ distributed
class DistributedError(HiproError, RuntimeError):
    """A multi-process run that cannot start or go on: a backend without its
    devices, a peer that never arrived, a launch that does not fit the work."""


class PeerTimeoutError(DistributedError):
    """Ranks that did not join the process group in time; `missing` lists them."""

    def __init__(self, missing: list[int], world_size: int, timeout_s: float, where: str):
        self.missing, self.world_size, self.timeout_s = list(missing), int(world_size), float(timeout_s)
        names = ", ".join(str(r) for r in self.missing)
        super().__init__(f"rank{'s' if len(self.missing) > 1 else ''} {names} of {world_size} did not arrive "
                         f"within {timeout_s:g} s at {where} (a node or process that never started, or a "
                         f"different --rdzv-endpoint / MASTER_ADDR:MASTER_PORT)")


class RankMismatchError(DistributedError, ValueError):
    """The ranks of one job disagree on something that must be the same everywhere
    (spec, seed, options, data sizes); the message names the rank and the key."""


class UnsupportedAutogradError(HiproError, NotImplementedError):
    """A fused op asked for an autograd mode it has no formula for (forward-mode
    AD, double backward): raised rather than returning zeros."""


class FlexAttentionUnavailable(HiproError, RuntimeError):
    """attention='flex' asked for something FlexAttention cannot do here (a CPU backward,
    or a torch without FlexAttention)."""


# ------------------------------------------------------------------- data
class WeightsMismatchError(HiproError, ValueError):
    """A weights file does not fit the chosen model."""


class SpecError(HiproError, ValueError):
    """A task spec, or the images it names, is unusable (one-line message)."""


class BadImageError(SpecError):
    """An image file that cannot be decoded."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot decode image {path}: {reason}")


class ImageReadError(HiproError, OSError):
    """An image file that could not be read (a permission or I/O error): not a bad
    image, so never skipped by skip_bad_images (a skip would be cached, and outlive
    the fix)."""


class CacheWriteError(HiproError, OSError):
    """A cache file could not be written (disk full, a name too long, ...); names the file."""


class BundledDataError(HiproError, RuntimeError):
    """A package that ships bundled data is missing or its data is unreadable."""


# ----------------------------------------------------------------- method
class FewShotError(HiproError, ValueError):
    """A few-shot draw that cannot be made (a class with too few images, bad K)."""


class TaskSpecError(HiproError, ValueError):
    """Bad task definitions: empty tasks, duplicate class names, feature mismatches."""


class TreeError(HiproError, ValueError):
    """A malformed task tree or a tree that does not match the tasks."""


class AffinityMatrixError(TreeError):
    """An affinity matrix that cannot be clustered (shape, names, non-finite values)."""


class NonFiniteAffinityError(HiproError, FloatingPointError):
    """The task-affinity matrix came out NaN/inf (training diverged)."""


class CheckpointError(HiproError, ValueError):
    """A missing, corrupt or incompatible checkpoint (other than task/tree mismatches)."""


class NonFiniteLossError(HiproError, RuntimeError):
    """The training loss became NaN/inf; `epoch`, `step` and `tasks` (or `prior`,
    the hierarchy prior's value, when every task's loss was finite) name where."""

    def __init__(self, epoch: int, step: int, tasks: dict[str, float], prior: float | None = None):
        self.epoch, self.step, self.tasks, self.prior = epoch, step, dict(tasks), prior
        if not tasks and prior is not None:  # the tasks' losses were finite
            super().__init__(f"non-finite loss at epoch {epoch}, step {step}: the hierarchy prior is {prior} "
                             "(lower parent_prior, or the lr)")
            return
        detail = ", ".join(f"{t!r} (loss {v})" for t, v in tasks.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: task(s) {detail}; "
                         "lower the lr, disable amp, or check the features")


# -------------------------------------------------------------------- app
class CliError(HiproError):
    """A usage problem found by the CLI itself (one line)."""


class RunDirError(HiproError):
    """A run directory that cannot be used as asked: not empty without --resume /
    --overwrite, not a run of this command, or holding a symlink where hipro writes."""
