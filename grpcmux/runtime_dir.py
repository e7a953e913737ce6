"""The server's runtime directory: where the local services' private socket lives.

Ours alone: a directory (not a link) owned by the user running grpcmux, mode 0700,
so only that user reaches the socket. Without ``--runtime-dir`` a fresh temporary
directory is made and removed at exit; a given one is kept, its stale socket removed.
"""

import os
import shutil
import stat
import tempfile

from grpcmux.listening import StartupError

LOCAL_SOCKET = "local.sock"


class RuntimeDir:
    """``create()`` the directory (``path`` afterwards), ``remove()`` it when done."""

    def __init__(self, option=None):
        self._option = option
        self.path = None

    def create(self):
        path = self._option
        if not path:
            self.path = tempfile.mkdtemp(prefix="grpcmux-")  # 0700 whatever the umask
            return self.path
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass  # not a directory: refused below
        except OSError as error:
            raise StartupError(f"--runtime-dir {path}: cannot be created: "
                               f"{error.strerror.lower()}") from None
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise StartupError(
                f"--runtime-dir {path}: must be a directory (not a link) owned by "
                f"the user running grpcmux (uid {os.getuid()})"
            )
        os.chmod(path, 0o700)
        stale = os.path.join(path, LOCAL_SOCKET)
        if os.path.lexists(stale) and stat.S_ISSOCK(os.lstat(stale).st_mode):
            os.unlink(stale)
        self.path = path
        return path

    def socket_path(self, name=LOCAL_SOCKET):
        return os.path.join(self.path, name)

    def remove(self):
        """Remove what we made: the whole temporary directory, or our socket."""
        if self.path is None:
            return
        if not self._option:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            try:
                os.unlink(self.socket_path())
            except FileNotFoundError:
                pass
        self.path = None
