"""
TLS settings checks done at start.

The private key of the host is the daemon's identity: a key readable by
other users, or writable by anyone but its owner, is refused rather than
used.
"""

import os
import stat


class InsecureKey(OSError):
    """The TLS key file has unsafe permissions."""


def check_key_file(path):
    """Raise InsecureKey if others may read, or anyone but the owner may
    write, the key file at `path`."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise InsecureKey(
            f"TLS key file {path} has unsafe mode {mode:04o}: it must not be "
            f"readable by others nor writable by anyone but its owner "
            f"(chmod 0600 or 0640 with the imaged group)")
