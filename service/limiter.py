"""How many large queries run at once: at most ``per_client`` for one client and ``total``
on the whole service.

A large query (a cone wider than the small-cone radius, a range query without a small
cone) costs seconds of database and rendering time; left alone, a few clients sending
them occupy every worker and every core, and even ``/health`` waits. Small queries are
never limited.

A slot is an exclusive ``flock`` on a file in a directory that every worker process of
the service finds by itself (named after the user and the database it reads), so the
limits hold across gunicorn's processes and threads without any setup, and the kernel
frees the slots of a worker that crashed or was killed. A grant is held until its
response has been sent (see :func:`service.state.large_query`): a client that reads a large
answer slowly still counts against its limit.
"""
import fcntl
import hashlib
import os
import time
import stat
import tempfile

from sqlalchemy.engine import make_url

CLIENT_BUCKETS = 4096      # clients hash into this many slot groups: bounded file count


class LargeQueryRefused(Exception):
    """No slot: the client already runs its share, or the service runs its maximum."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Grant:
    """Held slots; :meth:`release` (idempotent) frees them."""

    def __init__(self, handles):
        self._handles = handles

    def release(self):
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()          # closing the file drops its flock


def lock_directory(database_url: str) -> str:
    """The slot directory shared by every process serving ``database_url`` as this user:
    <tmp>/lamost-vac-<uid>/<hash of the URL without its password>, private to the user."""
    parsed = make_url(database_url)
    identity = parsed._replace(password=None).render_as_string(hide_password=True)
    user_directory = os.path.join(tempfile.gettempdir(), f"lamost-vac-{os.getuid()}")
    os.makedirs(user_directory, mode=0o700, exist_ok=True)
    info = os.lstat(user_directory)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & 0o077):
        raise RuntimeError(f"{user_directory} must be a directory of this user, private "
                           "to it (it holds the service's query slots)")
    directory = os.path.join(user_directory,
                             hashlib.sha256(identity.encode()).hexdigest()[:16])
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return directory


class LargeQueryLimiter:
    """``per_client`` slots per client address and ``total`` for the service.

    A query whose slot is taken waits up to ``grace_s`` for it before it is refused: a
    client that sends its next large query as soon as it has read the previous answer
    would otherwise often find its own slot still held, because the thread that sent that
    answer frees it a moment later (it waits for the GIL, on a busy machine for several
    milliseconds). The grace is short next to a large query's run time, so a client (or
    an attacker) with a query really running still gets its 429 at once after it.
    """

    POLL_S = 0.01

    def __init__(self, directory: str, per_client: int, total: int, retry_after_s: int,
                 grace_s: float = 0.5):
        self.directory = directory
        self.per_client = per_client
        self.total = total
        self.retry_after_s = retry_after_s
        self.grace_s = grace_s

    def _take_within(self, names, deadline):
        """:meth:`_take`, retried until ``deadline`` (time.monotonic)."""
        names = list(names)
        while True:
            handle = self._take(names)
            if handle is not None or time.monotonic() >= deadline:
                return handle
            time.sleep(self.POLL_S)

    def _take(self, names):
        """An open file holding the lock of the first free name, or None."""
        for name in names:
            descriptor = os.open(os.path.join(self.directory, name),
                                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600)
            handle = os.fdopen(descriptor, "rb+", buffering=0)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            except BaseException:
                handle.close()
                raise
            return handle
        return None

    def acquire(self, client: str) -> Grant:
        """Slots for one large query of ``client`` (its address), or
        :class:`LargeQueryRefused` naming the limit that was reached."""
        deadline = time.monotonic() + self.grace_s
        bucket = int(hashlib.sha256(client.encode()).hexdigest(), 16) % CLIENT_BUCKETS
        mine = self._take_within((f"client-{bucket:04d}-{i}" for i in range(self.per_client)),
                                 deadline)
        if mine is None:
            raise LargeQueryRefused(
                f"too many large queries at once from {client}: at most {self.per_client} "
                "at a time per client (a cone wider than the small-cone radius, or a range "
                "query without such a cone); retry when one has finished",
                self.retry_after_s)
        server = self._take_within((f"server-{i}" for i in range(self.total)), deadline)
        if server is None:
            mine.close()
            raise LargeQueryRefused(
                f"the service is running its maximum of {self.total} large queries; retry "
                "later, or narrow the query to a small cone", self.retry_after_s)
        return Grant([server, mine])
